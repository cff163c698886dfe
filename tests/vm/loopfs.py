"""A small filesystem of a test's own, on a loop device: ext4 to fill up, XFS to share extents."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

MKFS = {
    # No blocks reserved for root: the daemon (root) sees the same "full" as everyone.
    "ext4": ["mkfs.ext4", "-q", "-F", "-m", "0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
}


@contextlib.contextmanager
def loop_filesystem(fs: str, size_mib: int, name: str) -> Iterator[Path]:
    base = Path(os.environ.get("BULKHEAD_TEST_ROOT", "/var/tmp/bulkhead-tests"))
    base.mkdir(parents=True, exist_ok=True)
    image, mnt = base / f"{name}-{os.getpid()}.img", base / f"{name}-{os.getpid()}"
    with open(image, "wb") as f:
        f.truncate(size_mib * 2**20)
    subprocess.run([*MKFS[fs], str(image)], check=True, capture_output=True)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        image.unlink(missing_ok=True)
        try:
            mnt.rmdir()
        except OSError:
            pass
