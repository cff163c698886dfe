"""The ``linux-kernel`` pool: dom0's qube kernels, seen as read-only volumes.

As in Qubes, every qube has a ``kernel`` volume whose id is the version in its
``kernel`` property, in a pool over ``$BULKHEAD_HOME/vm-kernels``.  It is not a
disk: the backend boots the kernel image directly (see :mod:`bulkhead.lifecycle`),
so starting and stopping it does nothing, and it cannot be changed through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backend.base import DiskSpec
from ..errors import QubesValueError, StoragePoolException
from .pool import Pool, Volume, VolumeConfig

KERNEL_IMAGE = "vmlinux"


class KernelVolume(Volume):
    pool: "LinuxKernelPool"

    @property
    def image(self) -> Path:
        return self.pool.dir_path / self.vid / KERNEL_IMAGE

    @property
    def path(self) -> str:
        return str(self.image) if self.vid else ""

    @property
    def usage(self) -> int:
        try:
            return self.image.stat().st_size if self.vid else 0
        except OSError:
            return 0

    @property
    def size(self) -> int:
        return self.usage

    def revisions(self) -> dict[str, str]:
        return {}

    def is_dirty(self) -> bool:
        return False

    def committed_path(self) -> Path | None:
        return self.image if self.vid and self.image.exists() else None

    async def create(self) -> None:
        pass  # kernels are installed by `bulkhead setup`, not per qube

    async def remove(self) -> None:
        pass

    async def start(self) -> DiskSpec:
        raise StoragePoolException("the kernel volume is booted directly, not given as a disk")

    async def stop(self) -> None:
        pass

    def _read_only(self, what: str) -> StoragePoolException:
        return StoragePoolException(f"cannot {what} the kernel volume: it is dom0's kernel "
                                    f"{self.vid!r}; choose another with the qube's `kernel` property")

    async def revert(self, revision: str | None = None) -> None:
        raise self._read_only("revert")

    async def resize(self, size: int) -> None:
        raise self._read_only("resize")

    async def import_data(self, src: Path, size: int | None = None) -> None:
        raise self._read_only("import into")

    async def clone_from(self, other: Volume) -> None:
        raise self._read_only("clone into")


class LinuxKernelPool(Pool):
    driver = "linux-kernel"

    def __init__(self, name: str, dir_path: str | Path, **config: Any) -> None:
        super().__init__(name, dir_path=str(dir_path), **config)
        self.dir_path = Path(dir_path)

    def init_volume(self, vid: str, config: VolumeConfig) -> KernelVolume:
        if vid and ("/" in vid or vid in (".", "..")):
            raise QubesValueError(f"invalid kernel version {vid!r}")
        return KernelVolume(self, vid, config)

    async def setup(self) -> None:
        self.dir_path.mkdir(parents=True, exist_ok=True)

    def info(self) -> dict[str, str]:
        return {"name": self.name, "driver": self.driver, "dir_path": str(self.dir_path),
                "size": "0", "usage": "0"}
