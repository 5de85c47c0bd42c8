"""Every module of ``bench/`` imports: a rename in ``agent/`` that a benchmark still uses fails
here, not on the day someone runs ``make bench``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_the_bench_module_imports(name: str) -> None:
    module = "bench" if name == "__init__" else f"bench.{name}"
    importlib.import_module(module)
