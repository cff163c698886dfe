"""A Lifecycle with no machines and no disks, for tests of the management core.

``BULKHEAD_TEST_LIFECYCLE=fake`` makes the daemon use it (and :class:`FakePool`
for every pool), so the Admin API, the store and the events can be tested end
to end without QEMU.  It keeps power states and volumes in memory and calls
the listener exactly as the real lifecycle does: ``domain_stopped`` after
every shutdown, kill or (with :meth:`FakeLifecycle.crash`) crash.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend.base import DiskSpec, ExitReason, PowerState
from .errors import QubesVolumeRevisionNotFoundError, StoragePoolException
from .storage.pool import Pool, Volume, VolumeConfig

if TYPE_CHECKING:  # pragma: no cover
    from .lifecycle_api import LifecycleListener

_revision_counter = itertools.count(1)


class FakeVolume(Volume):
    def __init__(self, pool: Pool, vid: str, config: VolumeConfig) -> None:
        super().__init__(pool, vid, config)
        self.exists = False
        self.content = "empty"
        self._dirty = False
        self._revisions: dict[str, tuple[str, str]] = {}  # id -> (time, content)

    @property
    def usage(self) -> int:
        return 0 if not self.exists else min(self.config.size, 4096)

    def revisions(self) -> dict[str, str]:
        return {rev: when for rev, (when, _) in self._revisions.items()}

    async def create(self) -> None:
        self.exists = True

    async def remove(self) -> None:
        self.exists = False
        self._revisions.clear()

    async def start(self) -> DiskSpec:
        self._dirty = True
        return DiskSpec(name=self.name, path=Path("/dev/null"), fmt="raw",
                        readonly=not self.config.rw)

    async def stop(self) -> None:
        if self._dirty and self.config.save_on_stop:
            self._keep_revision()
        self._dirty = False

    def _keep_revision(self) -> None:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self._revisions[str(next(_revision_counter))] = (when, self.content)
        while len(self._revisions) > max(0, self.config.revisions_to_keep):
            del self._revisions[next(iter(self._revisions))]

    def is_dirty(self) -> bool:
        return self._dirty

    async def revert(self, revision: str | None = None) -> None:
        if revision is None:
            if not self._revisions:
                raise QubesVolumeRevisionNotFoundError("no revision to revert to")
            revision = list(self._revisions)[-1]
        if revision not in self._revisions:
            raise QubesVolumeRevisionNotFoundError(f"No such revision: {revision}")
        self.content = self._revisions.pop(revision)[1]

    async def resize(self, size: int) -> None:
        if size < self.config.size:
            raise StoragePoolException(f"For your own safety, shrinking of {self.vid} is "
                                       f"disabled ({size} < {self.config.size})")
        self.config.size = size

    async def import_data(self, src: Path, size: int | None = None) -> None:
        self.content = f"imported:{src}"

    async def clone_from(self, other: Volume) -> None:
        self.content = getattr(other, "content", "cloned")

    def committed_path(self) -> Path | None:
        return None


class FakePool(Pool):
    driver = "file"

    def init_volume(self, vid: str, config: VolumeConfig) -> Volume:
        return FakeVolume(self, vid, config)

    def info(self) -> dict[str, str]:
        info = {"driver": self.driver, "name": self.name}
        info.update({k: str(v) for k, v in sorted(self.config.items())})
        return info

    async def setup(self) -> None:
        return None


def fake_pool_factory(name: str, driver: str, config: dict[str, str]) -> Pool:
    return FakePool(name, **config)


class FakeLifecycle:
    """Implements bulkhead.lifecycle_api.Lifecycle in memory."""

    def __init__(self, app: Any = None, paths: Any = None) -> None:
        self.listener: "LifecycleListener | None" = None
        self.states: dict[str, PowerState] = {}
        self.volumes: dict[tuple[str, str], Volume] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, qube): what was asked, in order
        self.fail_start: set[str] = set()
        self.start_delay = 0.0

    def describe(self) -> str:
        return "fake lifecycle: no machines are run (tests only)"

    # --- storage ---------------------------------------------------------------
    def volume(self, vm: Any, name: str) -> Volume:
        key = (vm.name, name)
        volume = self.volumes.get(key)
        if volume is None:
            config = vm.volume_config[name]
            volume = vm.app.pools[config.pool].init_volume(vm.volume_vid(name), config)
            self.volumes[key] = volume
        return volume

    async def resize_volume(self, vm: Any, name: str, size: int) -> None:
        await self.volume(vm, name).resize(size)

    async def create_volumes(self, vm: Any) -> None:
        self.calls.append(("create_volumes", vm.name))
        for name in vm.volume_config:
            await self.volume(vm, name).create()

    async def remove_volumes(self, vm: Any) -> None:
        self.calls.append(("remove_volumes", vm.name))
        for name in list(vm.volume_config):
            volume = self.volumes.pop((vm.name, name), None)
            if volume is not None:
                await volume.remove()

    async def clone_volumes(self, src: Any, dst: Any) -> None:
        for name, config in dst.volume_config.items():
            if config.save_on_stop and name in src.volume_config:
                await self.volume(dst, name).clone_from(self.volume(src, name))

    # --- power -----------------------------------------------------------------
    def power_state(self, vm: Any) -> PowerState:
        return self.states.get(vm.name, PowerState.HALTED)

    async def start(self, vm: Any) -> None:
        self.calls.append(("start", vm.name))
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
        if vm.name in self.fail_start:
            raise RuntimeError("injected start failure")
        self.states[vm.name] = PowerState.RUNNING

    def _stopped(self, vm: Any, reason: ExitReason) -> None:
        self.states[vm.name] = PowerState.HALTED
        if self.listener is not None:
            self.listener.domain_stopped(vm, reason)

    async def shutdown(self, vm: Any, force: bool = False, wait: bool = False,
                       timeout: float | None = None) -> None:
        self.calls.append(("shutdown", vm.name))
        self._stopped(vm, ExitReason.SHUTDOWN)

    async def kill(self, vm: Any) -> None:
        self.calls.append(("kill", vm.name))
        self._stopped(vm, ExitReason.KILLED)

    async def pause(self, vm: Any) -> None:
        self.calls.append(("pause", vm.name))
        self.states[vm.name] = PowerState.PAUSED

    async def unpause(self, vm: Any) -> None:
        self.calls.append(("unpause", vm.name))
        self.states[vm.name] = PowerState.RUNNING

    async def adopt(self, vm: Any) -> bool:
        self.calls.append(("adopt", vm.name))
        return self.power_state(vm) != PowerState.HALTED

    def start_lock(self, vm: Any) -> asyncio.Lock:
        return self.locks.setdefault(vm.name, asyncio.Lock())

    # --- test helpers ------------------------------------------------------------
    def crash(self, vm: Any) -> None:
        """The machine dies on its own."""
        self._stopped(vm, ExitReason.CRASHED)
