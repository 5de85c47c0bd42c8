"""A small tmpfs of a test's own on a temporary directory: for a store that fills up or goes
read-only for real.  Needs root (``mount``); unmounted (lazily if still busy) and removed by
:meth:`Tmpfs.close`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class Tmpfs:
    """A tmpfs of ``size`` (``32m``) named ``name`` (its source in ``/proc/mounts``)."""

    def __init__(self, size: str, name: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
        self.path = self.base / "mnt"
        self.path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", name, str(self.path)],
            check=True,
        )

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Fill the filesystem to the last block; the filler file is returned for removal."""
        filler = self.path / "filler"
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            chunk = 65536
            while chunk:
                try:
                    os.write(descriptor, b"\0" * chunk)
                except OSError:
                    chunk //= 2
        finally:
            os.close(descriptor)
        return filler

    def close(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
