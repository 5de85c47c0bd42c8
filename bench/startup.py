"""What a fresh ``egress-agent check`` costs before it samples: this tree beside an earlier one.

``python -m bench.startup [--against REV] [--runs N]`` times, interleaved run by run, for this
tree and for a git worktree of ``REV`` (default :data:`BEFORE_PIPELINE`, the commit before the
pipeline of issue 10): the import of ``agent.cli`` in a fresh interpreter (``-X importtime``'s
total), whether Thrift was among the imports, and the wall time of a whole ``egress-agent check
--format json`` (which samples this host: compare the two trees, not the figures with other
runs).  Bytecode is cached for both, as an installed package has it.  The worktree is removed
afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from bench.measure import REPO_ROOT
from bench.report import markdown_table, publish

BEFORE_PIPELINE = "8a28fda"
LAUNCHER = "import sys\nfrom agent.cli import main\nsys.exit(main())\n"


@dataclass
class Tree:
    """A checkout of the agent, run through a launcher script beside its ``agent/`` (a script
    puts its own directory first on ``sys.path``, as the packaged launcher does)."""

    label: str
    root: str
    import_ms: List[float] = field(default_factory=list)
    check_ms: List[float] = field(default_factory=list)
    imports_thrift: Optional[bool] = None

    @property
    def launcher(self) -> str:
        return os.path.join(self.root, "bench-startup-launcher")

    def prepare(self) -> None:
        with open(self.launcher, "w") as handle:
            handle.write(LAUNCHER)

    def measure(self) -> None:
        probe = (
            f"import sys; sys.path.insert(0, {self.root!r}); import agent.cli; "
            "print('thrift' in sys.modules)"
        )
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            cwd=self.root,
        )
        self.imports_thrift = done.stdout.strip() == "True"
        total = [line for line in done.stderr.splitlines() if line.rstrip().endswith("agent.cli")]
        self.import_ms.append(int(total[-1].split("|")[1]) / 1000.0)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, self.launcher, "check", "--format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            cwd=self.root,
        )
        self.check_ms.append((time.perf_counter() - started) * 1000.0)


def _worktree(revision: str, directory: str) -> str:
    path = os.path.join(directory, "before")
    subprocess.run(
        ["git", "-C", REPO_ROOT, "worktree", "add", "--detach", "-q", path, revision],
        check=True,
    )
    return path


def compare(against: str, runs: int) -> List[Tree]:
    """Both trees measured ``runs`` times, alternating which goes first."""
    scratch = tempfile.mkdtemp(prefix="eab-startup-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(scratch, "pycache")
    trees = [Tree("this tree", REPO_ROOT)]
    try:
        trees.append(Tree(f"before ({against})", _worktree(against, scratch)))
        for tree in trees:
            tree.prepare()
            tree.measure()  # discarded: fills the bytecode cache
            tree.import_ms.clear()
            tree.check_ms.clear()
        for run in range(runs):
            for tree in trees if run % 2 == 0 else trees[::-1]:
                tree.measure()
    finally:
        for tree in trees:
            if os.path.exists(tree.launcher):
                os.unlink(tree.launcher)
        if len(trees) > 1:
            subprocess.run(
                ["git", "-C", REPO_ROOT, "worktree", "remove", "--force", trees[1].root],
                check=False,
            )
        shutil.rmtree(scratch, ignore_errors=True)
    return trees


def section(trees: Sequence[Tree], runs: int, against: str) -> str:
    rows = [
        [
            tree.label,
            f"{statistics.median(tree.import_ms):.1f}",
            "yes" if tree.imports_thrift else "no",
            f"{statistics.median(tree.check_ms):.1f}",
            f"{min(tree.check_ms):.1f}",
        ]
        for tree in trees
    ]
    return "\n".join(
        [
            "## Start-up of `egress-agent check` (issue 10)",
            "",
            f"Run: `python -m bench.startup --against {against} --runs {runs}`; medians of "
            f"{runs} interleaved runs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            markdown_table(
                [
                    "tree",
                    "import agent.cli ms",
                    "imports thrift",
                    "check --format json ms (median)",
                    "min",
                ],
                rows,
            ),
        ]
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--against", default=BEFORE_PIPELINE, help="git revision to compare")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    trees = compare(args.against, args.runs)
    body = section(trees, args.runs, args.against)
    publish("startup", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
