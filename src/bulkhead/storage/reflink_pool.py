"""The ``file-reflink`` pool driver (Qubes' name): for filesystems that share extents
between files (btrfs, XFS with reflink), where a copy costs no time and no space.

It keeps the ``file`` driver's layout, markers and crash safety (see
:mod:`bulkhead.storage.file_pool`), with one difference: every committed image
stands alone.  A start makes the writable copy a *reflink* of the current
image (``FICLONE``: the two files share every extent until one is written), a
commit renames it into place as the file driver does, and a revision that
falls out of ``revisions_to_keep`` is simply deleted -- no chain, nothing to
merge.  Snapshots (an AppVM's root) stay qcow2 overlays on the source's image,
which is as cheap.

``bulkhead setup`` makes the default pool this driver when ``$BULKHEAD_HOME``
is on a filesystem that answers ``FICLONE`` (:func:`reflink_supported`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..backend.base import DiskSpec
from ..errors import StoragePoolException
from . import qemu_img
from .file_pool import FilePool
from .file_volume import TMP_PREFIX, FileVolume, is_no_space
from .pool import Volume

FICLONE = 0x40049409   # _IOW(0x94, 9, int), linux/fs.h


def reflink(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` sharing all its extents; fsynced."""
    fd_src = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(fd_dst, FICLONE, fd_src)
            os.fsync(fd_dst)
        except BaseException:
            os.close(fd_dst)
            fd_dst = -1
            dst.unlink(missing_ok=True)
            raise
        finally:
            if fd_dst >= 0:
                os.close(fd_dst)
    finally:
        os.close(fd_src)


def reflink_supported(directory: Path) -> bool:
    """True if files in ``directory`` can share extents (btrfs, XFS with reflink=1)."""
    directory.mkdir(parents=True, exist_ok=True)
    a, b = directory / ".reflink-probe-a", directory / ".reflink-probe-b"
    try:
        a.write_bytes(b"\0" * 4096)
        reflink(a, b)
        return True
    except OSError:
        return False
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


class ReflinkVolume(FileVolume):
    pool: "ReflinkPool"

    async def _copy_current(self, what: str) -> Path:
        """A reflink copy of the current image under a temporary name."""
        current = self.committed_path()
        if current is None:
            raise StoragePoolException(
                f"volume {self.vid} has no committed image in {self.dir}; "
                "was it created? (`qvm-volume info` shows its state)")
        tmp = self.dir / f"{TMP_PREFIX}{what}.qcow2"
        tmp.unlink(missing_ok=True)
        try:
            reflink(current, tmp)
            if await qemu_img.virtual_size(tmp) < self.config.size:
                await qemu_img.resize(tmp, self.config.size)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.EOPNOTSUPP, errno.EXDEV,
                                                      errno.EINVAL):
                raise StoragePoolException(
                    f"pool {self.pool.name}: {self.dir} does not share extents between files "
                    "(the file-reflink driver needs btrfs or XFS with reflink)") from e
            if is_no_space(e):
                raise StoragePoolException(self.pool.no_space_message(
                    f"volume {self.vid}", 1 << 20)) from e
            raise
        return tmp

    async def start(self, saved_root: Path | None = None) -> DiskSpec:
        c = self.config
        if not (c.save_on_stop and not c.snap_on_start):
            return await super().start(saved_root)   # snapshots: qcow2 overlays, as the file pool
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._recover()
        if self.is_dirty():
            await self._commit()
        tmp = await self._copy_current("start")
        os.rename(tmp, self.dirty)
        return DiskSpec(name=self.name, path=self.dirty, fmt="qcow2", readonly=not c.rw)

    async def resize(self, size: int) -> None:
        if size < self.config.size:
            await super().resize(size)       # refused there, with the same words
            return
        self._refuse_if_started("resize")
        await self._recover()
        old = self.config.size
        self.config.size = size
        try:
            if self.committed_path() is not None:
                await self._install(await self._copy_current("resize"))
                self.mark_fs_resize()
        except BaseException:
            self.config.size = old
            raise

    async def clone_from(self, other: Volume) -> None:
        src = other.committed_path()
        if src is None or not isinstance(other, FileVolume) or \
                await qemu_img.backing_of(src) is not None:
            await super().clone_from(other)   # a chain (file pool): flattened
            return
        self._refuse_if_started("clone into")
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._recover()
        tmp = self.dir / f"{TMP_PREFIX}clone.qcow2"
        tmp.unlink(missing_ok=True)
        reflink(src, tmp)
        self.config.size = max(self.config.size, await qemu_img.virtual_size(tmp))
        await self._install(tmp)
        await self.pool.schedule_merge(self)


class ReflinkPool(FilePool):
    driver = "file-reflink"
    volume_class = ReflinkVolume
