"""A volume of the ``file`` pool: a directory of qcow2 images in one backing chain.

Layout of one volume (``<dir_path>/<vid>/``)::

    img-<n>-<tok>.qcow2  committed images, ``n`` growing; the highest is the current
                         content, each other one is backed by its predecessor (by
                         relative name), the oldest stands alone
    dirty.qcow2          while started: the machine's writable overlay on the current image
    dirty.source         for a snapshot: which image of the source it was taken from
    merge.pending        the name of the image being merged into its successor
    revert.pending       the name of the image a revert is making current again

Why commits take constant time: a started volume's ``dirty.qcow2`` is an
overlay on the current image, so committing it is renaming it to the next
``img-<n+1>-*.qcow2`` -- no data is copied, whatever the qube wrote.  The old
current stays in the chain as a revision.

Why it is crash-safe: committed images are never rewritten while they are
anyone's content.  Each change has one atomic step:

- commit: the rename of ``dirty.qcow2``; before it the old revision is
  current and the dirty copy waits to be committed again, after it the new one;
- revert: writing ``revert.pending``; the images newer than the one it names
  are then deleted, and recovery finishes the deletion after a crash;
- merge (an image falling out of ``revisions_to_keep``, in the background),
  whichever copies less:

  * the successor is the bigger: ``qemu-img rebase`` copies into it the clusters
    it read from the expired image, then drops the backing name from its header
    (the last, one-sector write): what it shows never changes, so every moment
    is old-and-new at once; the expired image is deleted after;
  * else ``qemu-img commit`` copies the successor's clusters *into the expired
    image* (which only the successor's reads still fall through to, for clusters
    the successor does not hold, so nobody sees a change), then the expired image
    is renamed over its successor: the successor's name now holds the same
    content, standalone.  ``merge.pending`` marks the expired image as no longer
    a whole revision first, so it can never be reverted to once the copy began.

A merge never runs on a start or stop path: stopping schedules it, starting
(the volume's own, or a snapshot of it) cancels it -- a half-done merge is
just redone later.  QEMU's image locks keep a merge from writing into an image
a running machine reads (a template's old image under its AppVMs' roots): the
merge then waits for a later chance.

The pool itself (its directory, the space reserve, the merges it schedules) is
:mod:`bulkhead.storage.file_pool`.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from ..backend import jail
from ..backend.base import DiskSpec
from ..errors import QubesValueError, StoragePoolException
from . import qemu_img
from .pool import Volume, VolumeConfig

if TYPE_CHECKING:  # pragma: no cover
    from .file_pool import FilePool

DIRTY = "dirty.qcow2"
SOURCE_STAMP = "dirty.source"
MERGE_STAMP = "merge.pending"
REVERT_STAMP = "revert.pending"
RESIZE_FS = "resize-fs"
ORIGIN_SUFFIX = ".origin"
TMP_PREFIX = ".tmp-"
IMAGE = re.compile(r"^img-(\d{1,9})-[0-9a-f]{8}\.qcow2$")
# The layout before backing chains (one flattened current, revisions as hard links).
OLD_CURRENT = "current.qcow2"
OLD_REVISION = re.compile(r"^rev-(\d{1,9})\.qcow2$")
OLD_BASE_STAMP = "dirty.base"
# What a fresh qcow2 overlay takes on disk (header, L1 and refcount tables, 64 KiB
# clusters): said in the message when there is not even that much room.
OVERLAY_BYTES = 256 * 1024

log = logging.getLogger(__name__)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)    # a full disk leaves nothing behind
        raise
    qemu_img.fsync_dir(path.parent)


def src_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


class FileVolume(Volume):
    pool: "FilePool"

    def __init__(self, pool: "FilePool", vid: str, config: VolumeConfig) -> None:
        super().__init__(pool, vid, config)
        self.dir = pool.volume_dir(vid)

    # --- the chain ------------------------------------------------------------
    def _images(self) -> list[tuple[int, Path]]:
        """Committed images, oldest first (the last one is current)."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for name in names:
            m = IMAGE.match(name)
            if m:
                out.append((int(m.group(1)), self.dir / name))
        out.sort()
        if REVERT_STAMP in names:
            # A revert passed its atomic step: the images newer than its target are gone
            # for everyone already, even before recovery deletes them.
            try:
                target = (self.dir / REVERT_STAMP).read_text().strip()
            except OSError:
                target = ""
            keep = [n for n, p in out if p.name == target]
            if keep:
                out = [(n, p) for n, p in out if n <= keep[0]]
        return out

    def _poisoned(self) -> str | None:
        """The image a merge began writing into: no longer a whole revision."""
        try:
            return (self.dir / MERGE_STAMP).read_text().strip() or None
        except OSError:
            return None

    def _revision_files(self) -> list[tuple[int, Path]]:
        """The revisions one can revert to: the ``revisions_to_keep`` newest below current."""
        images = self._images()[:-1]
        poisoned = self._poisoned()
        images = [(n, p) for n, p in images if p.name != poisoned]
        keep = max(0, self.config.revisions_to_keep)
        return images[max(0, len(images) - keep):] if keep else []

    def expired(self) -> list[Path]:
        """Images still in the chain (as backing data) but no longer kept as revisions."""
        kept = {p for _, p in self._revision_files()}
        return [p for _, p in self._images()[:-1] if p not in kept]

    def _next_image_name(self) -> str:
        images = self._images()
        n = images[-1][0] + 1 if images else 1
        return f"img-{n}-{secrets.token_hex(4)}.qcow2"

    # --- paths -------------------------------------------------------------
    @property
    def current(self) -> Path:
        """The current committed image (a path that does not exist if there is none)."""
        images = self._images()
        return images[-1][1] if images else self.dir / OLD_CURRENT

    @property
    def dirty(self) -> Path:
        return self.dir / DIRTY

    @property
    def path(self) -> str:
        return str(self.current)

    def committed_path(self) -> Path | None:
        current = self.current
        return current if current.exists() else None

    def _source_volume(self) -> Volume:
        if not self.config.source:
            raise StoragePoolException(f"volume {self.vid} takes a snapshot but has no source")
        return self.pool.resolve(self.config.source)

    # --- reports -------------------------------------------------------------
    @property
    def usage(self) -> int:
        """Bytes this volume holds on the host: every image of its chain (the kept
        revisions and the ones waiting to be merged) and the started copy."""
        total = 0
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
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
            # Image names are never reused for other content (a merge keeps the content).
            return src is None or taken != str(src)
        except OSError:
            return True

    def fs_resize_pending(self) -> bool:
        """True once after a resize: the guest should grow its filesystem at next start."""
        return (self.dir / RESIZE_FS).exists()

    def clear_fs_resize(self) -> None:
        (self.dir / RESIZE_FS).unlink(missing_ok=True)

    def mark_fs_resize(self) -> None:
        (self.dir / RESIZE_FS).touch()

    # --- recovery ---------------------------------------------------------------
    async def _recover(self) -> None:
        """Finish or undo what a crash interrupted; called before every change."""
        if not self.dir.is_dir():
            return
        self._clean_tmp()
        await self._migrate_old_layout()
        target = None
        try:
            target = (self.dir / REVERT_STAMP).read_text().strip()
        except OSError:
            pass
        if target is not None:
            self._finish_revert(target)
        poisoned = self._poisoned()
        if poisoned is not None and not (self.dir / poisoned).exists():
            # The merge's rename happened; only its marker was left.
            (self.dir / MERGE_STAMP).unlink(missing_ok=True)

    async def _migrate_old_layout(self) -> None:
        """A volume of the flattening driver: its images become a chain of standalone ones."""
        old = self.dir / OLD_CURRENT
        if not old.exists():
            if (self.dir / OLD_BASE_STAMP).exists():
                await self._fix_old_dirty()     # the crash came between the two steps
            return
        log.info("volume %s: moving to the backing-chain layout", self.vid)
        n = self._images()[-1][0] if self._images() else 0
        for _, p in sorted((int(m.group(1)), self.dir / name) for name in os.listdir(self.dir)
                           if (m := OLD_REVISION.match(name))):
            if os.path.samefile(p, old):   # a crash mid-commit left current linked twice
                p.unlink()
                continue
            n += 1
            os.rename(p, self.dir / f"img-{n}-{secrets.token_hex(4)}.qcow2")
        new = self.dir / f"img-{n + 1}-{secrets.token_hex(4)}.qcow2"
        os.rename(old, new)
        qemu_img.fsync_dir(self.dir)
        await self._fix_old_dirty()

    async def _fix_old_dirty(self) -> None:
        """A started copy of the old layout (it wrote ``dirty.base``) names its backing
        ``current.qcow2``: point it at the image that name became."""
        current = self.committed_path()
        if self.dirty.exists() and current is not None and self.config.save_on_stop \
                and not self.config.snap_on_start:
            if await qemu_img.backing_of(self.dirty) == OLD_CURRENT:
                await qemu_img.rebase_unsafe(self.dirty, current.name)
        (self.dir / OLD_BASE_STAMP).unlink(missing_ok=True)

    def _finish_revert(self, target: str) -> None:
        images = sorted((int(m.group(1)), self.dir / name) for name in os.listdir(self.dir)
                        if (m := IMAGE.match(name)))
        keep = [n for n, p in images if p.name == target]
        if keep:
            for n, p in reversed(images):
                if n > keep[0]:
                    p.unlink()
            qemu_img.fsync_dir(self.dir)
        (self.dir / REVERT_STAMP).unlink(missing_ok=True)
        qemu_img.fsync_dir(self.dir)

    def _tmp(self, what: str) -> Path:
        return self.dir / f"{TMP_PREFIX}{what}.qcow2"

    def _clean_tmp(self) -> None:
        for p in self.dir.glob(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)

    async def _new_image(self, what: str, size: int | None, backing: Path | str | None) -> Path:
        """A fresh qcow2 under a temporary name (the caller renames it into place);
        on failure nothing is left behind, and a full pool is said in plain words."""
        tmp = self._tmp(what)
        for attempt in (1, 2):
            try:
                await qemu_img.create(tmp, size, backing=backing)
                return tmp
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if not is_no_space(e):
                    raise
                # A full pool must not lock the user out of a qube: the pool's reserve
                # is given up so that the qube starts (and can be cleaned up).
                # (The volumes of one qube start side by side: another may have given it up.)
                if attempt == 1 and (self.pool.release_reserve(f"volume {self.vid}")
                                     or self.pool.space()[2] > 2 * OVERLAY_BYTES):
                    continue
                raise StoragePoolException(self.pool.no_space_message(
                    f"volume {self.vid}", OVERLAY_BYTES)) from e
        raise AssertionError("unreachable")

    # --- lifecycle -------------------------------------------------------------
    async def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._recover()
        c = self.config
        if c.save_on_stop and not c.snap_on_start and not self._images():
            # An empty disk: the guest formats a blank private volume at first boot,
            # so dom0 never builds a filesystem for a qube.
            tmp = await self._new_image("create", c.size, None)
            await self._install(tmp)

    async def remove(self) -> None:
        await self.pool.cancel_merge(self.vid)
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

    async def start(self, saved_root: Path | None = None) -> DiskSpec:
        """Make the started copy the machine gets.  ``saved_root``: for a snapshot, the
        frozen root of a saved boot state (an overlay on the source's current image,
        see :mod:`bulkhead.bootstate`) to put the fresh overlay on instead."""
        self.dir.mkdir(parents=True, exist_ok=True)
        c = self.config
        if c.save_on_stop and not c.snap_on_start:
            await self.pool.cancel_merge(self.vid)
            await self._recover()
            if self.is_dirty():
                # A previous run ended without its commit (the daemon was away):
                # commit it now -- a rename, so even a full pool takes it.
                await self._commit()
            current = self.committed_path()
            if current is None:
                raise StoragePoolException(
                    f"volume {self.vid} has no committed image in {self.dir}; "
                    "was it created? (`qvm-volume info` shows its state)")
            tmp = await self._new_image("start", c.size, current.name)
            os.rename(tmp, self.dirty)
        elif c.snap_on_start:
            source = self._source_volume()
            src = source.committed_path()
            if src is None:
                raise StoragePoolException(
                    f"volume {self.vid} snapshots {c.source}, which has no committed image yet")
            # A merge writing into the source's chain would hold an image our machine reads.
            cancel = getattr(source.pool, "cancel_merge", None)
            if cancel is not None:
                await cancel(source.vid)
            self._clean_tmp()
            self.dirty.unlink(missing_ok=True)
            # The snapshot has the source's size: a template's root defines its AppVMs' roots.
            tmp = await self._new_image("start", None, (saved_root or src).absolute())
            _write_atomically(self.dir / SOURCE_STAMP, str(src))
            os.rename(tmp, self.dirty)
        else:
            # volatile: a fresh empty disk at every start.
            self._clean_tmp()
            self.dirty.unlink(missing_ok=True)
            tmp = await self._new_image("start", c.size, None)
            os.rename(tmp, self.dirty)
        return DiskSpec(name=self.name, path=self.dirty, fmt="qcow2", readonly=not c.rw)

    async def stop(self) -> None:
        c = self.config
        if c.save_on_stop and not c.snap_on_start:
            await self._recover()
            if self.is_dirty():
                await self._commit()
            await self.pool.schedule_merge(self)
            self.pool.keep_reserve()
        else:
            self.dirty.unlink(missing_ok=True)
            (self.dir / SOURCE_STAMP).unlink(missing_ok=True)

    async def _commit(self) -> None:
        """The started copy becomes the current revision: fsync, then one rename."""
        try:
            qemu_img.fsync_file(self.dirty)
            await self._install(self.dirty)
        except OSError as e:
            if is_no_space(e):
                raise StoragePoolException(self.pool.no_space_message(
                    f"committing volume {self.vid}", OVERLAY_BYTES)) from e
            raise StoragePoolException(f"cannot commit volume {self.vid}: {e}") from e

    async def _install(self, image: Path) -> Path:
        """Make the fully written ``image`` (an overlay on the current one, or standalone)
        the current revision, atomically; returns its name in the chain."""
        # A committed image is dom0's alone: the started copy it was had been given to
        # the qube's jailed QEMU, which must not keep any hold on it.
        jail.take_back(image)
        qemu_img.fsync_file(image)
        final = self.dir / self._next_image_name()
        os.rename(image, final)
        qemu_img.fsync_dir(self.dir)
        return final

    # --- where an image came from ------------------------------------------------
    # An image imported whole from a file outside the pool (the template image in the
    # build cache) has the same content as that file, as long as neither changed: a
    # saved boot state built on that file serves every instance that imported it
    # (see bulkhead.bootstate).  ``<image>.origin`` records both files' stat.
    def _write_origin(self, image: Path, src: Path) -> None:
        s, i = src.stat(), image.stat()
        _write_atomically(image.with_name(image.name + ORIGIN_SUFFIX), json.dumps({
            "src": str(src.absolute()), "src_stat": [s.st_size, s.st_mtime_ns],
            "stat": [i.st_size, i.st_mtime_ns]}))

    def origin_of(self, image: Path) -> Path | None:
        """The file ``image`` is an unchanged import of, if that file is unchanged too."""
        try:
            o = json.loads(image.with_name(image.name + ORIGIN_SUFFIX).read_text())
            src, s, i = Path(o["src"]), src_stat(Path(o["src"])), src_stat(image)
            if s == o["src_stat"] and i == o["stat"]:
                return src
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    # --- merging revisions that fell out of revisions_to_keep ---------------------------
    async def merge_expired(self) -> None:
        """Merge every expired image into its successor, oldest first (see the module doc)."""
        await self._recover()
        while True:
            if self.is_dirty():
                return            # the qube runs: its chain is in use; merge after its stop
            expired = self.expired()
            images = [p for _, p in self._images()]
            if not expired or len(images) < 2:
                return
            old = images[0]
            if old not in expired:
                # Only the oldest image can stand alone; a newer expired one waits its turn
                # (it is merged once everything older than it is).
                return
            await self._merge(old, images[1])

    async def _merge(self, old: Path, successor: Path) -> None:
        backing = await qemu_img.backing_of(successor)
        if backing is None:
            # The successor stands alone (an import): nothing reads the old image any more.
            old.unlink()
        elif backing != old.name:
            raise StoragePoolException(
                f"volume {self.vid}: {successor.name} is backed by {backing!r}, not by "
                f"{old.name}; leaving the chain as it is")
        elif successor.stat().st_blocks > old.stat().st_blocks and \
                await qemu_img.backing_of(old) is None:
            # The successor holds more (a session that wrote a lot): copying the old
            # image's clusters into it costs less time and room than the other way.
            await self._merge_step(qemu_img.absorb_backing(successor),
                                   lambda: old.stat().st_blocks * 512)
            qemu_img.fsync_file(successor)
            old.unlink()
            qemu_img.fsync_dir(self.dir)
        else:
            if self._poisoned() != old.name:
                _write_atomically(self.dir / MERGE_STAMP, old.name)
            await self._merge_step(qemu_img.commit_into_backing(successor),
                                   lambda: successor.stat().st_blocks * 512)
            qemu_img.fsync_file(old)
            st = successor.stat()
            os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))  # the revision's date stays
            os.replace(old, successor)
            qemu_img.fsync_dir(self.dir)
        (self.dir / MERGE_STAMP).unlink(missing_ok=True)
        qemu_img.fsync_dir(self.dir)

    async def _merge_step(self, step: Awaitable[None], needed: Callable[[], int]) -> None:
        """One qemu-img step of a merge; a full disk becomes the pool's one-line message
        with the room the step needs."""
        try:
            await step
        except StoragePoolException as e:
            if is_no_space(e):
                raise StoragePoolException(self.pool.no_space_message(
                    f"merging an old revision of volume {self.vid}", needed())) from e
            raise

    # --- changes requested by the user ---------------------------------------
    def _refuse_if_started(self, what: str) -> None:
        if self.is_dirty():
            raise StoragePoolException(f"cannot {what} volume {self.vid} while its qube is running")

    async def revert(self, revision: str | None = None) -> None:
        self._refuse_if_started("revert")
        await self.pool.cancel_merge(self.vid)
        await self._recover()
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
        _write_atomically(self.dir / REVERT_STAMP, path.name)   # the atomic step
        self._finish_revert(path.name)

    async def resize(self, size: int) -> None:
        if size < self.config.size:
            raise QubesValueError(
                f"shrinking volume {self.vid} from {self.config.size} to {size} bytes is not "
                "supported: data could be lost")
        self._refuse_if_started("resize")
        await self.pool.cancel_merge(self.vid)
        await self._recover()
        current = self.committed_path()
        if current is not None:
            # A new, empty overlay of the new size: the current image is never rewritten.
            tmp = await self._new_image("resize", size, current.name)
            await self._install(tmp)
            self.mark_fs_resize()
        self.config.size = size

    def grown_live(self, size: int) -> None:
        """The running machine's started copy was grown to ``size`` (QMP block_resize)."""
        self.config.size = size

    async def import_data(self, src: Path, size: int | None = None) -> None:
        await self._import(src, size, flatten=False)

    async def _import(self, src: Path, size: int | None, flatten: bool) -> None:
        self._refuse_if_started("import into")
        self.dir.mkdir(parents=True, exist_ok=True)
        await self.pool.cancel_merge(self.vid)
        await self._recover()
        tmp = self._tmp("import")
        try:
            if flatten:
                await qemu_img.flatten(src, tmp)      # our own chain: its backing names are ours
            else:
                await qemu_img.convert_from(src, tmp)
            want = max(size or 0, self.config.size)
            if await qemu_img.virtual_size(tmp) < want:
                await qemu_img.resize(tmp, want)
            new_size = await qemu_img.virtual_size(tmp)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_no_space(e):
                raise StoragePoolException(self.pool.no_space_message(
                    f"importing into volume {self.vid}", os.stat(src).st_blocks * 512)) from e
            raise
        self.config.size = new_size
        same_size = not flatten and await qemu_img.virtual_size(src) == new_size
        image = await self._install(tmp)
        if same_size:
            self._write_origin(image, src)
        await self.pool.schedule_merge(self)

    async def clone_from(self, other: Volume) -> None:
        src = other.committed_path()
        if src is None:
            raise StoragePoolException(f"volume {other.vid} has no committed content to clone")
        await self._import(src, other.size, flatten=isinstance(other, FileVolume))
