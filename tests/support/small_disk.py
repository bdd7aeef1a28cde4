"""A real, small file system that a test can fill up: a tmpfs of a few megabytes.

    with SmallDisk(tmp_path / "disk", size_mb=16) as disk:
        ... point the relay's storage at disk.path ...
        disk.fill()   # ENOSPC for every write from now on
        disk.free()   # space is back

Mounting needs root (CAP_SYS_ADMIN). Where it cannot be done the test is skipped, and fails
under CI, like any other missing real component.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tests.support.processes import missing

_FILLER = ".filler"


class SmallDisk:
    def __init__(self, path: Path, size_mb: int = 16):
        self.path = Path(path)
        self.size_mb = size_mb
        self.mounted = False

    def __enter__(self) -> "SmallDisk":
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs",
                                 str(self.path)], capture_output=True, text=True)
        if result.returncode != 0:
            missing(f"a small tmpfs to fill up (mount needs root): {result.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write a filler file until the file system is full; returns the bytes written."""
        written = 0
        block = b"\0" * (256 * 1024)
        with open(self.path / _FILLER, "ab", buffering=0) as handle:
            while True:
                try:
                    written += handle.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        # Top up the last blocks one small write at a time.
        with open(self.path / f"{_FILLER}-tail", "ab", buffering=0) as handle:
            while True:
                try:
                    written += handle.write(b"\0" * 512)
                except OSError:
                    break
        return written

    def free(self) -> None:
        for name in (_FILLER, f"{_FILLER}-tail"):
            (self.path / name).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def __exit__(self, *exc_info) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False
