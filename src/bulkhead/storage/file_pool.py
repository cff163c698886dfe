"""The ``file`` pool driver: volumes as qcow2 backing chains in a directory.

Each volume is a :class:`~bulkhead.storage.file_volume.FileVolume` (its layout
and why its commits take constant time and survive a crash are told there).
The pool keeps what the volumes share: the directory, a space reserve given up
when a qube could not start for lack of room, the background merges of
revisions that fell out of ``revisions_to_keep`` (one task a volume, cancelled
by a start), and the figures ``admin.pool.Info`` reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import QubesValueError, StoragePoolException
from .file_volume import TMP_PREFIX, FileVolume, _mib
from .pool import Pool, Volume, VolumeConfig

# Kept allocated in each pool while there is room, and given up when a qube cannot
# start for lack of space: enough for its new overlays and some writes.
RESERVE = "reserve"
RESERVE_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


class FilePool(Pool):
    driver = "file"
    volume_class: type[FileVolume] = FileVolume

    def __init__(self, name: str, dir_path: str | Path, revisions_to_keep: int = 1,
                 resolver: Any = None, merge_in_background: bool = True, **config: Any) -> None:
        super().__init__(name, dir_path=str(dir_path), revisions_to_keep=revisions_to_keep, **config)
        self.dir_path = Path(dir_path)
        self.revisions_to_keep = int(revisions_to_keep)
        # resolves "pool:vid" of a snapshot's source to a Volume (set by whoever owns all pools)
        self.resolver = resolver
        # False: a stop merges before it returns (tests that look at the result at once)
        self.merge_in_background = merge_in_background
        self._volumes: dict[str, FileVolume] = {}
        self._merges: dict[str, asyncio.Task[None]] = {}

    def volume_dir(self, vid: str) -> Path:
        parts = vid.split("/")
        if not vid or any(p in ("", ".", "..") for p in parts):
            raise QubesValueError(f"invalid volume id {vid!r}")
        return self.dir_path.joinpath(*parts)

    def init_volume(self, vid: str, config: VolumeConfig) -> FileVolume:
        vol = self.volume_class(self, vid, config)
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
        self.keep_reserve()

    # --- the reserve: room kept back for starting qubes on a full disk -------------------
    @property
    def reserve_path(self) -> Path:
        return self.dir_path / RESERVE

    def keep_reserve(self) -> None:
        """(Re)make the reserve if it is missing and there is ample room for it."""
        if self.reserve_path.exists():
            return
        _, _, free = self.space()
        if free < 4 * RESERVE_BYTES:
            return
        tmp = self.dir_path / (TMP_PREFIX + RESERVE)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.info("pool %s: cannot keep a reserve: %s", self.name, e)

    def release_reserve(self, why: str) -> bool:
        """Free the reserve; True if there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        log.warning("pool %s (%s) is full: gave up its %d MiB reserve for %s; free space "
                    "on this disk", self.name, self.dir_path, RESERVE_BYTES // 2**20, why)
        return True

    # --- background merges ---------------------------------------------------------
    async def schedule_merge(self, vol: FileVolume) -> None:
        """Merge ``vol``'s expired images, in the background unless told otherwise."""
        if not vol.expired():
            return
        if not self.merge_in_background:
            await self._run_merge(vol)
            return
        running = self._merges.get(vol.vid)
        if running is not None and not running.done():
            return
        task = asyncio.get_running_loop().create_task(self._run_merge(vol))
        self._merges[vol.vid] = task
        task.add_done_callback(lambda t, vid=vol.vid: self._merges.pop(vid, None)
                               if self._merges.get(vid) is t else None)

    async def _run_merge(self, vol: FileVolume) -> None:
        try:
            await vol.merge_expired()
        except asyncio.CancelledError:
            log.info("volume %s: merge of old revisions interrupted; it is redone later", vol.vid)
            raise
        except Exception as e:  # noqa: BLE001 -- background work: the next stop retries
            if "lock" in str(e):
                log.info("volume %s: old revisions not merged yet, an image is in use "
                         "(a running qube reads it); retried at a later stop", vol.vid)
            else:
                log.warning("volume %s: merging old revisions failed: %s", vol.vid, e)

    async def cancel_merge(self, vid: str) -> None:
        task = self._merges.pop(vid, None)
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def cancel_merges(self) -> None:
        """Stop every merge in progress (daemon exit): each is redone later."""
        for vid in list(self._merges):
            await self.cancel_merge(vid)

    async def wait_merges(self) -> None:
        """Until the background merges running now are done (tests, benchmarks, shutdown)."""
        tasks = [t for t in self._merges.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- space ------------------------------------------------------------------------------
    def space(self) -> tuple[int, int, int]:
        """(size, used, free for us) of the filesystem holding the pool, in bytes."""
        try:
            st = os.statvfs(self.dir_path)
        except OSError:
            return 0, 0, 0
        size = st.f_blocks * st.f_frsize
        return size, size - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize

    def no_space_message(self, what: str, needed: int) -> str:
        _, _, free = self.space()
        return (f"{what}: no space left in pool {self.name} ({self.dir_path}): "
                f"needs about {_mib(needed)} more, {_mib(free)} free")

    def info(self) -> dict[str, str]:
        size, usage, _ = self.space()
        return {
            "name": self.name,
            "driver": self.driver,
            "dir_path": str(self.dir_path),
            "revisions_to_keep": str(self.revisions_to_keep),
            "size": str(size),
            "usage": str(usage),
        }
