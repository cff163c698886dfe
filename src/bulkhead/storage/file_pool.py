"""The ``file`` pool driver: every volume a directory of qcow2 images.

Layout of one volume (``<dir_path>/<vid>/``)::

    current.qcow2     the committed content (what a snapshot is taken from)
    rev-<n>.qcow2     kept earlier revisions, n growing (revisions_to_keep of them)
    dirty.qcow2       while started: the machine's writable image
    dirty.source      for a snapshot: which revision of the source it was taken from
    dirty.base        for a started save_on_stop volume: which current it was started on

Why it is crash-safe: committed images are never written in place.  A commit
flattens ``dirty.qcow2`` (an overlay on ``current.qcow2``) into a new
standalone image, fsyncs it, keeps the old current as a revision by a hard
link, and renames the new image over ``current.qcow2`` -- one atomic step.
A crash before the rename leaves the old current in place and ``dirty.qcow2``
still there to commit again; a crash after it leaves a ``dirty.qcow2`` whose
``dirty.base`` no longer names the current image, so recovery knows the commit
happened and only removes it.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..backend.base import DiskSpec
from ..errors import QubesValueError, StoragePoolException
from . import qemu_img
from .pool import Pool, Volume, VolumeConfig

CURRENT = "current.qcow2"
DIRTY = "dirty.qcow2"
SOURCE_STAMP = "dirty.source"
BASE_STAMP = "dirty.base"
RESIZE_FS = "resize-fs"
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


def _stamp(path: Path) -> str:
    """Identifies one committed revision of a volume: a commit makes a new inode."""
    st = path.stat()
    return f"{st.st_ino}:{st.st_mtime_ns}"


class FileVolume(Volume):
    pool: "FilePool"

    def __init__(self, pool: "FilePool", vid: str, config: VolumeConfig) -> None:
        super().__init__(pool, vid, config)
        self.dir = pool.volume_dir(vid)

    # --- paths -------------------------------------------------------------
    @property
    def current(self) -> Path:
        return self.dir / CURRENT

    @property
    def dirty(self) -> Path:
        return self.dir / DIRTY

    @property
    def path(self) -> str:
        return str(self.current)

    def committed_path(self) -> Path | None:
        return self.current if self.current.exists() else None

    def _source_volume(self) -> Volume:
        if not self.config.source:
            raise StoragePoolException(f"volume {self.vid} takes a snapshot but has no source")
        return self.pool.resolve(self.config.source)

    def _revision_files(self) -> list[tuple[int, Path]]:
        revs = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith("rev-") and p.name.endswith(".qcow2"):
                    try:
                        revs.append((int(p.name[4:-6]), p))
                    except ValueError:
                        continue
        return sorted(revs)

    # --- reports -------------------------------------------------------------
    @property
    def usage(self) -> int:
        total = 0
        for p in (self.current, self.dirty):
            try:
                total += p.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def revisions(self) -> dict[str, str]:
        out = {}
        for n, p in self._revision_files():
            ts = datetime.datetime.fromtimestamp(p.stat().st_mtime, datetime.timezone.utc)
            out[str(n)] = ts.isoformat(timespec="seconds")
        return out

    def is_dirty(self) -> bool:
        return self.dirty.exists()

    def is_outdated(self) -> bool:
        if not self.config.snap_on_start or not self.is_dirty():
            return False
        src = self._source_volume().committed_path()
        try:
            taken = (self.dir / SOURCE_STAMP).read_text().strip()
            return src is None or taken != _stamp(src)
        except OSError:
            return True

    def fs_resize_pending(self) -> bool:
        """True once after a resize: the guest should grow its filesystem at next start."""
        return (self.dir / RESIZE_FS).exists()

    def clear_fs_resize(self) -> None:
        (self.dir / RESIZE_FS).unlink(missing_ok=True)

    # --- lifecycle -------------------------------------------------------------
    async def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        c = self.config
        if c.save_on_stop and not c.snap_on_start and not self.current.exists():
            # An empty disk: the guest formats a blank private volume at first boot,
            # so dom0 never builds a filesystem for a qube.
            tmp = self._tmp("create")
            await qemu_img.create(tmp, c.size)
            await self._install_current(tmp, keep_old=False)

    async def remove(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self._prune_empty_parents()

    def _prune_empty_parents(self) -> None:
        parent = self.dir.parent
        root = self.pool.dir_path
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def start(self) -> DiskSpec:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        c = self.config
        if c.save_on_stop and not c.snap_on_start:
            if self.is_dirty():
                # A previous run ended without its commit (the daemon was away):
                # commit it now rather than lose what the qube wrote.
                await self._commit()
            if not self.current.exists():
                raise StoragePoolException(
                    f"volume {self.vid} has no committed image at {self.current}; "
                    "was it created? (`qvm-volume info` shows its state)")
            await qemu_img.create(self.dirty, c.size, backing=CURRENT)
            (self.dir / BASE_STAMP).write_text(_stamp(self.current))
        elif c.snap_on_start:
            src = self._source_volume().committed_path()
            if src is None:
                raise StoragePoolException(
                    f"volume {self.vid} snapshots {c.source}, which has no committed image yet")
            self.dirty.unlink(missing_ok=True)
            # The snapshot has the source's size: a template's root defines its AppVMs' roots.
            await qemu_img.create(self.dirty, None, backing=src.absolute())
            (self.dir / SOURCE_STAMP).write_text(_stamp(src))
        else:
            # volatile: a fresh empty disk at every start.
            self.dirty.unlink(missing_ok=True)
            await qemu_img.create(self.dirty, c.size)
        return DiskSpec(name=self.name, path=self.dirty, fmt="qcow2", readonly=not c.rw)

    async def stop(self) -> None:
        c = self.config
        if c.save_on_stop and not c.snap_on_start:
            if self.is_dirty():
                await self._commit()
        else:
            self.dirty.unlink(missing_ok=True)
            (self.dir / SOURCE_STAMP).unlink(missing_ok=True)

    async def _commit(self) -> None:
        if self._already_committed():
            log.info("volume %s: its last commit completed before a crash; dropping the copy",
                     self.vid)
            self._prune_revisions()  # the crash may have come before the pruning
        else:
            tmp = self._tmp("commit")
            await qemu_img.flatten(self.dirty, tmp)
            await self._install_current(tmp, keep_old=True)
        self.dirty.unlink(missing_ok=True)
        (self.dir / BASE_STAMP).unlink(missing_ok=True)
        qemu_img.fsync_dir(self.dir)

    def _already_committed(self) -> bool:
        """True if ``dirty`` was started on a current that a commit has since replaced."""
        try:
            base = (self.dir / BASE_STAMP).read_text().strip()
        except OSError:
            return False  # started by an older version: commit, as before
        return self.current.exists() and base != _stamp(self.current)

    async def _install_current(self, tmp: Path, keep_old: bool) -> None:
        """Make the fully written image ``tmp`` the current one, atomically."""
        qemu_img.fsync_file(tmp)
        if keep_old and self.current.exists() and self.config.revisions_to_keep > 0:
            revs = self._revision_files()
            # After a crash between this link and the rename below, the newest
            # revision already is the current image: don't keep it twice.
            if not (revs and os.path.samefile(revs[-1][1], self.current)):
                n = revs[-1][0] + 1 if revs else 1
                os.link(self.current, self.dir / f"rev-{n}.qcow2")
        os.replace(tmp, self.current)
        qemu_img.fsync_dir(self.dir)
        self._prune_revisions()

    def _prune_revisions(self) -> None:
        revs = self._revision_files()
        excess = len(revs) - max(0, self.config.revisions_to_keep)
        for _, p in revs[:max(0, excess)]:
            p.unlink(missing_ok=True)

    def _tmp(self, what: str) -> Path:
        return self.dir / f"{TMP_PREFIX}{what}.qcow2"

    def _clean_tmp(self) -> None:
        for p in self.dir.glob(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)

    # --- changes requested by the user ---------------------------------------
    def _refuse_if_started(self, what: str) -> None:
        if self.is_dirty():
            raise StoragePoolException(f"cannot {what} volume {self.vid} while its qube is running")

    async def revert(self, revision: str | None = None) -> None:
        self._refuse_if_started("revert")
        revs = self._revision_files()
        if not revs:
            raise StoragePoolException(f"volume {self.vid} has no revision to revert to")
        if revision is None:
            path = revs[-1][1]
        else:
            match = [p for n, p in revs if str(n) == revision]
            if not match:
                raise QubesValueError(f"volume {self.vid} has no revision {revision!r}; "
                                      f"kept revisions: {', '.join(str(n) for n, _ in revs)}")
            path = match[0]
        os.replace(path, self.current)
        qemu_img.fsync_dir(self.dir)

    async def resize(self, size: int) -> None:
        if size < self.config.size:
            raise QubesValueError(
                f"shrinking volume {self.vid} from {self.config.size} to {size} bytes is not "
                "supported: data could be lost")
        self._refuse_if_started("resize")
        if self.current.exists():
            await qemu_img.resize(self.current, size)
            (self.dir / RESIZE_FS).touch()
        self.config.size = size

    async def import_data(self, src: Path, size: int | None = None) -> None:
        self._refuse_if_started("import into")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp("import")
        await qemu_img.convert_from(src, tmp)
        want = max(size or 0, self.config.size)
        if await qemu_img.virtual_size(tmp) < want:
            await qemu_img.resize(tmp, want)
        self.config.size = await qemu_img.virtual_size(tmp)
        await self._install_current(tmp, keep_old=True)

    async def clone_from(self, other: Volume) -> None:
        src = other.committed_path()
        if src is None:
            raise StoragePoolException(f"volume {other.vid} has no committed content to clone")
        await self.import_data(src, size=other.size)


class FilePool(Pool):
    driver = "file"

    def __init__(self, name: str, dir_path: str | Path, revisions_to_keep: int = 1,
                 resolver: Any = None, **config: Any) -> None:
        super().__init__(name, dir_path=str(dir_path), revisions_to_keep=revisions_to_keep, **config)
        self.dir_path = Path(dir_path)
        self.revisions_to_keep = revisions_to_keep
        # resolves "pool:vid" of a snapshot's source to a Volume (set by whoever owns all pools)
        self.resolver = resolver
        self._volumes: dict[str, FileVolume] = {}

    def volume_dir(self, vid: str) -> Path:
        parts = vid.split("/")
        if not vid or any(p in ("", ".", "..") for p in parts):
            raise QubesValueError(f"invalid volume id {vid!r}")
        return self.dir_path.joinpath(*parts)

    def init_volume(self, vid: str, config: VolumeConfig) -> FileVolume:
        vol = FileVolume(self, vid, config)
        self._volumes[vid] = vol
        return vol

    def resolve(self, source: str) -> Volume:
        pool_name, _, vid = source.partition(":")
        if self.resolver is not None:
            return self.resolver(source)
        if pool_name != self.name or vid not in self._volumes:
            raise StoragePoolException(f"unknown source volume {source!r}")
        return self._volumes[vid]

    async def setup(self) -> None:
        self.dir_path.mkdir(parents=True, exist_ok=True)

    def info(self) -> dict[str, str]:
        try:
            st = os.statvfs(self.dir_path)
            size = st.f_blocks * st.f_frsize
            usage = (st.f_blocks - st.f_bfree) * st.f_frsize
        except OSError:
            size = usage = 0
        return {
            "name": self.name,
            "driver": self.driver,
            "dir_path": str(self.dir_path),
            "revisions_to_keep": str(self.revisions_to_keep),
            "size": str(size),
            "usage": str(usage),
        }
