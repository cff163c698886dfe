"""Qubes' power lifecycle on the local QEMU backend: disks, machines and guest agents.

This is the real :class:`bulkhead.lifecycle_api.Lifecycle`.  For one start:

1. every volume is started (a fresh root snapshot for an AppVM, a dirty copy of
   private, a new volatile) -- in Qubes' order, root, private, volatile;
2. the backend launches the machine with dom0's kernel (the ``kernel`` property);
3. the qube counts as started only once its guest agent says HELLO.

When a machine goes away -- shut down, killed, crashed -- its volumes are
stopped (private committed as a new revision, snapshots discarded) and the
listener (the app) is told, so that it fires ``domain-shutdown``.  A failed
start undoes everything it did and raises with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bootstate, datadisk
from .agentlink import REFUSED, AgentLink, AgentLinkError
from .backend.accel import Accel, detect
from .backend.base import Backend, DiskSpec, ExitReason, Machine, MachineSpec, PowerState
from .config import Paths
from .errors import (BackendError, QubesException, QubesVMError, QubesVMNotHaltedError,
                     QubesVMNotRunningError, QubesVMNotStartedError,
                     QubesVMShutdownTimeoutError, StoragePoolException)
from .powerstate import ACTIVE, Power, PowerStates
from .ratelimit import qube_log
from .storage.monitor import DiskMonitor
from .storage.pool import Pool, Volume, VolumeConfig

if TYPE_CHECKING:  # pragma: no cover
    from .lifecycle_api import LifecycleListener
    from .vm.qubesvm import QubesVM

log = logging.getLogger(__name__)

VOLUME_ORDER = ("root", "private", "volatile")


class QemuLifecycle:
    """Runs qubes as local QEMU machines."""

    def __init__(self, app: Any, paths: Paths, backend: Backend | None = None) -> None:
        self.app = app
        self.paths = paths
        self._backend = backend
        self.listener: "LifecycleListener | None" = app
        self.machines: dict[str, Machine] = {}
        self.links: dict[str, AgentLink] = {}
        # One explicit power state per qube (powerstate.py), moved only by this class.
        self.power = PowerStates()
        self._announce: set[str] = set()          # qubes whose stop the listener must hear of
        self._stopped: dict[str, asyncio.Future[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._volume_locks: dict[str, asyncio.Lock] = {}
        # A stop whose volumes could not all be committed: the one line to tell whoever
        # waits for that stop (qvm-shutdown --wait, qvm-kill).
        self._stop_errors: dict[str, str] = {}
        self.disk_monitor = DiskMonitor(app)
        self.boot_states = bootstate.BootStates(self, paths.home / "boot-states",
                                                paths.cache / "boot-states")
        self.boot_states.clean_up()
        # --- networking: links, relays, pushes to the agents (bulkhead.network) ---
        from .network.manager import Network
        self.network = Network(app, paths)

    # --- the backend, created on first use (detecting KVM boots a kernel) ------
    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from .backend.qemu import QemuBackend
            self._backend = QemuBackend(self.paths, self._detect_accel())
        return self._backend

    def _detect_accel(self) -> Accel:
        version = getattr(self.app, "default_kernel", None) or ""
        kernel = self.paths.vm_kernel_image(str(version))
        if not kernel.exists():
            return Accel("tcg", "no qube kernel installed yet to probe KVM with")
        return detect(kernel, self.paths.cache)

    def describe(self) -> str:
        return self.backend.describe()

    def start_lock(self, vm: "QubesVM") -> asyncio.Lock:
        return self._locks.setdefault(vm.name, asyncio.Lock())

    # --- storage -------------------------------------------------------------
    def _pool(self, name: str) -> Pool:
        try:
            return self.app.pools[name]
        except KeyError:
            raise StoragePoolException(f"no storage pool named {name!r}") from None

    def volume(self, vm: "QubesVM", name: str) -> Volume:
        config: VolumeConfig = vm.volume_config[name]
        pool = self._pool(config.pool)
        if getattr(pool, "resolver", "absent") is None:
            pool.resolver = self._resolve_source  # type: ignore[attr-defined]
        if pool.driver == "linux-kernel":
            return pool.init_volume(str(vm.kernel or ""), config)  # its id is the version
        return pool.init_volume(volume_vid(vm, name), config)

    def _resolve_source(self, source: str) -> Volume:
        pool_name, _, vid = source.partition(":")
        pool = self._pool(pool_name)
        # Only the source's committed image is used; its size comes from the image itself.
        return pool.init_volume(vid, VolumeConfig(name=vid.rsplit("/", 1)[-1], pool=pool_name, size=0))

    def volumes(self, vm: "QubesVM") -> list[Volume]:
        names = [n for n in VOLUME_ORDER if n in vm.volume_config]
        names += [n for n in vm.volume_config if n not in names and n != "kernel"]
        return [self.volume(vm, n) for n in names]

    async def create_volumes(self, vm: "QubesVM") -> None:
        done: list[Volume] = []
        try:
            for vol in self.volumes(vm):
                await vol.pool.setup()
                await vol.create()
                done.append(vol)
        except BaseException:
            for vol in done:
                await vol.remove()
            raise

    async def remove_volumes(self, vm: "QubesVM") -> None:
        if self.power_state(vm) not in (PowerState.HALTED, PowerState.CRASHED):
            raise QubesVMNotHaltedError(vm)
        self.power.forget(vm.name)
        for vol in self.volumes(vm):
            await vol.remove()

    async def clone_volumes(self, src: "QubesVM", dst: "QubesVM") -> None:
        for name in dst.volume_config:
            d = self.volume(dst, name)
            if d.config.save_on_stop and not d.config.snap_on_start and name in src.volume_config:
                await d.clone_from(self.volume(src, name))

    # --- qrexec calls the qubes make ----------------------------------------------
    async def _on_call(self, call: Any, untrusted_target: str, untrusted_service: str) -> None:
        """A qube's agent asks for a qrexec call: the app's router decides and joins it."""
        router = getattr(self.app, "qrexec", None)
        if router is None:
            await call.finish(REFUSED, "qrexec calls are not served by this daemon")
            return
        await router.route(call, untrusted_target, untrusted_service)

    # --- state ---------------------------------------------------------------
    def power_of(self, vm: "QubesVM") -> Power:
        """The qube's power state as dom0 tracks it."""
        state = self.power.get(vm.name)
        if state in (Power.RUNNING, Power.PAUSED, Power.HALTING):
            machine = self.machines.get(vm.name)
            if machine is None or not machine.is_alive():
                # Its QEMU is gone; the exit's handling (volumes) is under way.
                return Power.HALTED
        return state

    def power_state(self, vm: "QubesVM") -> PowerState:
        return self.power_of(vm).qubes

    def is_running(self, vm: "QubesVM") -> bool:
        return self.power_of(vm) in ACTIVE

    def link(self, vm: "QubesVM") -> AgentLink:
        link = self.links.get(vm.name)
        if link is None:
            raise QubesVMNotRunningError(vm)
        return link

    async def agent(self, vm: "QubesVM", timeout: float | None = None) -> AgentLink:
        """The qube's agent link, connected (reconnecting if it had been dropped)."""
        if self.power_state(vm) != PowerState.RUNNING:
            raise QubesVMNotRunningError(vm)
        link = self.link(vm)
        await link.ensure_ready(timeout if timeout is not None else float(vm.qrexec_timeout))
        return link

    # --- start -------------------------------------------------------------------
    async def start(self, vm: "QubesVM") -> None:
        name = vm.name
        if self.is_running(vm):
            raise QubesVMNotHaltedError(vm, f"Domain is already running: {name!r}")
        try:
            await self._start(vm, use_saved_state=True)
        except bootstate.RestoreFailed as e:
            # The state would not load (QEMU refused it, or the restored agent did not
            # take RESUME: a template older than dom0's code): it is never tried
            # again, and this start boots cold.
            log.warning("qube %s: %s; discarding the saved boot state and booting cold",
                        name, e)
            self.boot_states.discard(e.state)
            await self._start(vm, use_saved_state=False)

    async def _start(self, vm: "QubesVM", use_saved_state: bool) -> None:
        name = vm.name
        self.power.move(vm, Power.STARTING)
        self._stop_errors.pop(name, None)
        self.disk_monitor.ensure_running()
        started: list[Volume] = []
        try:
            t_start = asyncio.get_running_loop().time()
            extra: dict[str, str] = {}
            # --- GUI (issue 10): Qubes' `gui` feature says the qube runs a GUI agent.
            if _wants_gui(vm):
                extra["gui"] = "1"
            # A netvm applies each firewall change with Python and nft: it keeps the
            # full TCG translation cache (backend/qemu_argv.tcg_tb_size_mib).
            if getattr(vm, "provides_network", False):
                extra["netvm"] = "1"
            volumes = self.volumes(vm)
            saved = self._saved_state(vm, volumes, extra) if use_saved_state else None
            if saved is not None:
                self.power.move(vm, Power.RESTORING)
            # Each start runs qemu-img; they are independent, so run them side by side.
            results = await asyncio.gather(
                *(vol.start(saved_root=saved.root) if saved and vol.name == "root"  # type: ignore[call-arg]
                  else vol.start() for vol in volumes),
                return_exceptions=True)
            started.extend(v for v, r in zip(volumes, results) if not isinstance(r, BaseException))
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            disks = [r for r in results if isinstance(r, DiskSpec)]
            for vol in volumes:
                if vol.name == "private" and getattr(vol, "fs_resize_pending", lambda: False)():
                    extra["resize_private"] = "1"
            spec = self._spec(vm, tuple(disks), extra)
            if saved is not None:
                spec = bootstate.restore_spec(spec)
            # --- networking: the qube's network devices, on descriptors dom0 made ---
            spec = dataclasses.replace(spec, nics=await self.network.prepare(vm))
            # --- qrexec: the data disk for bulk bytes into the qube (bulkhead.datadisk) ---
            data_path = datadisk.path_for(self.paths.run, name)
            spec = datadisk.with_data_disk(spec, data_path)
            data_disk = None
            if datadisk.has_data_disk(spec):
                data_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                datadisk.make_file(data_path)
                data_disk = datadisk.DataDisk(data_path)
            else:
                data_path.unlink(missing_ok=True)   # a daemon that adopts it must not find one
            self._stopped[name] = asyncio.get_running_loop().create_future()
            t_volumes = asyncio.get_running_loop().time()
            try:
                machine = await self.backend.start(spec, self._on_exit)
            finally:
                self.network.launched(vm)
            t_launch = asyncio.get_running_loop().time()
            self.machines[name] = machine
            self._watch_disk_errors(vm, machine)
            link = AgentLink(name, str(machine.agent_socket), on_call=self._on_call,
                             data_disk=data_disk)
            self.links[name] = link
            try:
                if saved is not None:
                    await self.boot_states.restore(vm, machine, link, saved, spec,
                                                   extra.get("resize_private") == "1",
                                                   float(vm.qrexec_timeout))
                else:
                    await link.ensure_ready(float(vm.qrexec_timeout))
            except AgentLinkError as e:
                raise QubesVMError(vm, f"{e}; the qube's console log is {machine.console_log}") from e
            # --- networking: configure the qube, join it to its netvm ---
            await self.network.started(vm)
            now = asyncio.get_running_loop().time()
            log.info("qube %s started (%s): volumes %.0f ms, QEMU launched %.0f ms, "
                     "agent ready %.0f ms", name, "restored" if saved else "cold",
                     (t_volumes - t_start) * 1000, (t_launch - t_volumes) * 1000,
                     (now - t_launch) * 1000)
            self.power.move(vm, Power.RUNNING)
        except BaseException as e:
            await self._undo_start(vm, started)
            if isinstance(e, QubesException):
                raise
            if isinstance(e, asyncio.CancelledError):
                raise
            raise QubesVMError(vm, f"cannot start qube {name!r}: {e}") from e
        finally:
            if self.power.get(name) in (Power.STARTING, Power.RESTORING):
                self.power.move(vm, Power.HALTED)   # the start failed, and nothing runs
        for vol in started:
            if vol.name == "private" and hasattr(vol, "clear_fs_resize"):
                vol.clear_fs_resize()
        self._announce.add(name)

    def _boot_plan(self, vm: "QubesVM", volumes: list[Volume],
                   extra: dict[str, str]) -> "tuple[str, MachineSpec, str, Path] | None":
        """The saved boot state ``vm`` would start from: ``(key, machine shape, root
        source, root image)``, or None if it boots cold whatever is saved."""
        states = self.boot_states
        if not states.wanted(vm) or not volumes or volumes[0].name != "root":
            return None
        root = volumes[0]
        source_of = getattr(root, "_source_volume", None)
        if source_of is None or not hasattr(root, "dirty"):
            return None   # only the file pool's snapshots can sit on a frozen root
        try:
            source = source_of()
            image = source.committed_path()
            if image is None:
                return None
            # An unchanged import of the build cache's template image: its states are shared.
            origin = getattr(source, "origin_of", lambda _i: None)(image)
            if origin is not None:
                image = origin
            nics = self.network.nic_shape(vm)
            if nics is None:
                return None   # a netvm with an uplink of its own: it boots
            shape = datadisk.with_data_disk(dataclasses.replace(
                self._spec(vm, tuple(DiskSpec(v.name, Path("/" + v.name), "qcow2",
                                              readonly=not v.config.rw) for v in volumes),
                           dict(extra)), nics=nics), Path("/" + datadisk.FILE_NAME))
            return states.key_for(shape, Path(image)), shape, str(root.config.source), Path(image)
        except (OSError, QubesException) as e:
            log.info("qube %s: no saved boot state (%s)", vm.name, e)
            return None

    def _saved_state(self, vm: "QubesVM", volumes: list[Volume],
                     extra: dict[str, str]) -> "bootstate.SavedState | None":
        """The saved boot state this start restores, if one is ready; if none is, one
        is built in the background for the next start (this one boots cold)."""
        plan = self._boot_plan(vm, volumes, extra)
        if plan is None:
            return None
        key, shape, root_source, image = plan
        found = self.boot_states.find(key, self.boot_states.home_of(image))
        if found is None:
            self.boot_states.build_later(key, shape, root_source, image)
        return found

    async def boot_state(self, vm: "QubesVM", build: bool = False) -> str:
        """One line on ``vm``'s saved boot state: ``ready KEY``, ``building KEY``,
        ``missing KEY`` or ``off``; with ``build``, it is built first if missing."""
        states = self.boot_states
        plan = self._boot_plan(vm, self.volumes(vm), {"gui": "1"} if _wants_gui(vm) else {})
        if plan is None:
            return "off"
        key, shape, root_source, image = plan
        found = states.find(key, states.home_of(image))
        if found is None and build:
            found = await states.build_now(key, shape, root_source, image)
            if found is None:
                raise QubesVMError(vm, f"qube {vm.name!r}: its saved boot state could not be "
                                       "built; see the daemon's log")
        if found is not None:
            return f"ready {found.key}"
        return ("building " if states.building(key) else "missing ") + key

    def _spec(self, vm: "QubesVM", disks: tuple[DiskSpec, ...], extra: dict[str, str]) -> MachineSpec:
        kernel_version = vm.kernel or ""
        kernel: Path | None = None
        if kernel_version:
            kernel = self.paths.vm_kernel_image(str(kernel_version))
            if not kernel.exists():
                raise QubesVMError(vm, f"kernel {kernel_version!r} of qube {vm.name!r} is not "
                                       f"installed ({kernel} is missing); run `bulkhead setup`")
        return MachineSpec(
            name=vm.name, qid=int(vm.qid), memory_mib=int(vm.memory), vcpus=int(vm.vcpus),
            virt_mode=str(vm.virt_mode), kernel=kernel, kernelopts=str(vm.kernelopts or ""),
            disks=disks, extra=extra)

    async def _undo_start(self, vm: "QubesVM", started: list[Volume]) -> None:
        name = vm.name
        machine = self.machines.get(name)
        if machine is not None and machine.is_alive():
            await machine.kill()
            fut = self._stopped.get(name)
            if fut is not None:
                await fut  # _after_exit stops the volumes
            return
        self.machines.pop(name, None)
        link = self.links.pop(name, None)
        if link:
            link.close("start failed")
            if link.data_disk is not None:
                link.data_disk.close()
        await self.network.stopped(vm)   # networking
        await self._stop_volumes(vm, started)

    async def _stop_volumes(self, vm: "QubesVM", volumes: list[Volume]) -> str | None:
        """Commit or discard each volume; one failing does not keep the others from stopping.

        A start that fails after QEMU was launched is undone both here and by the
        machine's exit handling; the lock makes the second pass find nothing to do
        instead of committing the same copy twice at once.  A volume that cannot be
        committed keeps its started copy (the next start runs on it); the failure is
        returned as one line naming the qube and the volume, and logged.
        """
        async with self._volume_locks.setdefault(vm.name, asyncio.Lock()):
            results = await asyncio.gather(*(vol.stop() for vol in volumes),
                                           return_exceptions=True)
        failures = []
        for vol, r in zip(volumes, results):
            if isinstance(r, BaseException):
                log.error("qube %s: cannot stop volume %s: %s", vm.name, vol.name, r)
                failures.append(f"volume {vol.name}: {r}")
        if not failures:
            return None
        return (f"qube {vm.name!r} stopped, but its changes are not committed ("
                + "; ".join(failures) + "); they are kept and its next start runs on them")

    # --- exits ---------------------------------------------------------------
    def _on_exit(self, name: str, reason: ExitReason) -> None:
        asyncio.ensure_future(self._after_exit(name, reason))

    async def _after_exit(self, name: str, reason: ExitReason) -> None:
        vm = self.app.domains[name] if name in self.app.domains else None
        link = self.links.pop(name, None)
        if link is not None:
            link.close("the qube stopped")
            if link.data_disk is not None:
                link.data_disk.close()
        self.machines.pop(name, None)
        if self.power.get(name) in ACTIVE:
            self.power.move(name, Power.CRASHED if reason == ExitReason.CRASHED else Power.HALTED)
        try:
            if vm is not None:
                await self.network.stopped(vm)   # networking: its links and relay go
                failure = await self._stop_volumes(vm, self.volumes(vm))
                if failure is not None:
                    self._stop_errors[name] = failure
                    # Before domain-shutdown, so that a client waiting for that event
                    # (qvm-shutdown --wait) has the reason when it sees the stop.
                    try:
                        vm.fire_event("domain-commit-failed", message=failure)
                    except Exception:  # noqa: BLE001 -- the stop must still be announced
                        log.exception("qube %s: announcing the failed commit failed", name)
        finally:
            fut = self._stopped.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if name in self._announce:
                self._announce.discard(name)
                if vm is not None and self.listener is not None:
                    self.listener.domain_stopped(vm, reason)

    async def _wait_stopped(self, vm: "QubesVM") -> None:
        fut = self._stopped.get(vm.name)
        if fut is not None:
            await asyncio.shield(fut)
        failure = self._stop_errors.pop(vm.name, None)
        if failure is not None:
            raise StoragePoolException(failure)

    # --- stop ------------------------------------------------------------------
    async def shutdown(self, vm: "QubesVM", force: bool = False, wait: bool = False,
                       timeout: float | None = None) -> None:
        """Ask the qube to power off; kill it if it has not within ``timeout`` seconds.

        The clock starts now, whatever the guest does: asking its agent happens
        in the background, bounded by the same deadline, so a qube that stops
        reading its port cannot hold the caller, nor stay Halting past it.
        """
        machine = self.machines.get(vm.name)
        if machine is None or not machine.is_alive():
            raise QubesVMNotStartedError(vm)
        self.power.require(vm, (Power.RUNNING, Power.PAUSED, Power.HALTING))
        if timeout is None:
            timeout = float(vm.shutdown_timeout)
        if self.power.get(vm.name) != Power.HALTING:
            self.power.move(vm, Power.HALTING)
            asyncio.ensure_future(self._shut_down(vm, machine, timeout))
        if wait:
            # The kill comes at ``timeout``; its exit is noticed at once.
            try:
                await asyncio.wait_for(machine.wait_exit(), timeout + 5)
            except asyncio.TimeoutError:
                raise QubesVMShutdownTimeoutError(vm) from None
            await self._wait_stopped(vm)

    async def _shut_down(self, vm: "QubesVM", machine: Machine, timeout: float) -> None:
        """Ask the agent (else press the power button), then enforce the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            link = self.links.get(vm.name)
            if link is None:
                raise AgentLinkError("no agent link")
            ask = min(timeout, 5.0)
            await asyncio.wait_for(link.ensure_ready(ask), ask)
            await link.request_shutdown(timeout=max(0.1, min(ask, deadline - loop.time())))
        except (AgentLinkError, OSError, asyncio.TimeoutError) as e:
            qube_log(log, vm.name, logging.INFO,
                     "qube %s: agent unreachable (%s); pressing the power button", vm.name, e)
            try:
                await machine.power_button()
            except BackendError:
                pass
        try:
            await asyncio.wait_for(machine.wait_exit(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            log.warning("qube %s did not shut down within %.0f s; killing it", vm.name, timeout)
            await machine.kill()

    async def kill(self, vm: "QubesVM") -> None:
        machine = self.machines.get(vm.name)
        if machine is None or not machine.is_alive():
            raise QubesVMNotStartedError(vm)
        await machine.kill()
        await self._wait_stopped(vm)

    async def close(self) -> None:
        """At daemon exit, before the event loop ends: stop the background storage work
        (a merge cut short is redone by the next daemon); the qubes keep running."""
        self.disk_monitor.stop()
        for name in list(self.app.pools):
            cancel_all = getattr(self.app.pools[name], "cancel_merges", None)
            if cancel_all is not None:
                await cancel_all()

    # --- disks while the qube runs ------------------------------------------------------
    def _watch_disk_errors(self, vm: "QubesVM", machine: Machine) -> None:
        """A write that hit a full host disk paused the machine (werror=enospc): say so."""
        name = vm.name

        def paused_on_error(device: str, reason: str, nospace: bool) -> None:
            if self.machines.get(name) is not machine or self.power.get(name) != Power.RUNNING:
                return
            self.power.move(name, Power.PAUSED)
            pool = ""
            if device in vm.volume_config:
                pool = vm.volume_config[device].pool
            why = "no space left" if nospace else "disk write failed"
            log.warning("qube %s paused: %s on volume %s (pool %s): %s; free space, "
                        "then `qvm-unpause %s`", name, why, device or "?", pool or "?",
                        reason, name)
            try:
                vm.fire_event("domain-paused", reason="no-space" if nospace else "io-error",
                              volume=device, pool=pool)
            except Exception:  # noqa: BLE001 -- called from the machine's event follower
                log.exception("qube %s: announcing its pause failed", name)

        machine.on_block_error = paused_on_error

    async def resize_volume(self, vm: "QubesVM", name: str, size: int) -> None:
        """Grow a volume; while the qube runs, live: QEMU grows the disk
        (``block_resize``), then the qube grows its filesystem (Qubes' qubes.ResizeDisk)."""
        vol = self.volume(vm, name)
        if size < vol.size:
            raise StoragePoolException(
                f"qube {vm.name!r}: volume {name} cannot shrink ({size} < {vol.size} bytes): "
                "data could be lost; make a new, smaller qube and copy the data instead")
        machine = self.machines.get(vm.name)
        if machine is None or not machine.is_alive() or not vol.is_dirty():
            await vol.resize(size)
            return
        if not vol.config.save_on_stop or vol.config.snap_on_start:
            raise StoragePoolException(
                f"qube {vm.name!r}: volume {name} is thrown away at shutdown; resize it "
                "while the qube is halted")
        await machine.block_resize(name, size)
        grown = getattr(vol, "grown_live", None)
        if grown is not None:
            grown(size)
        if name == "private":
            await self._grow_private_fs(vm, vol)

    async def _grow_private_fs(self, vm: "QubesVM", vol: Volume) -> None:
        try:
            link = await self.agent(vm, timeout=10.0)
            call = await link.exec("root", "/sbin/resize2fs /dev/vdb")
            await call.close_stdin()
            output = b""
            while True:
                kind, value = await asyncio.wait_for(call.next_event(), 120)
                if kind in ("stdout", "stderr") and isinstance(value, bytes):
                    output = (output + value)[-2000:]
                elif kind == "exit":
                    if value != 0:
                        # The qube's words: shown, so printable characters only, and few.
                        said = "".join(c if c.isprintable() else " " for c in
                                       output.decode(errors="replace")).strip()[-200:]
                        raise QubesVMError(vm, said or f"exit status {value}")
                    return
        except (QubesException, AgentLinkError, asyncio.TimeoutError, OSError) as e:
            # The disk did grow; the filesystem grows at the next start instead.
            mark = getattr(vol, "mark_fs_resize", None)
            if mark is not None:
                mark()
            raise StoragePoolException(
                f"qube {vm.name!r}: volume private was grown, but the qube could not grow its "
                f"filesystem now ({e}); it will at its next start") from e

    async def pause(self, vm: "QubesVM") -> None:
        self.power.require(vm, (Power.RUNNING,))
        await self.machines[vm.name].pause()
        self.power.move(vm, Power.PAUSED)

    async def unpause(self, vm: "QubesVM") -> None:
        self.power.require(vm, (Power.PAUSED,))
        await self.machines[vm.name].unpause()
        self.power.move(vm, Power.RUNNING)

    def stats(self, vm: "QubesVM") -> dict[str, int]:
        """For admin.vm.CurrentState: memory in KiB, as Qubes reports it, and CPU time in ns."""
        machine = self.machines.get(vm.name)
        static_max = int(vm.memory) * 1024
        pid = machine.pid if machine is not None else None
        if pid is None:
            return {"mem": 0, "mem_static_max": static_max, "cputime": 0}
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])  # utime + stime
            cputime = ticks * 10**9 // os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            cputime = 0
        return {"mem": host_memory_kib(pid) or static_max, "mem_static_max": static_max,
                "cputime": cputime}

    # --- daemon start ------------------------------------------------------------
    async def adopt(self, vm: "QubesVM") -> bool:
        machine = await self.backend.adopt(vm.name, self._on_exit)
        if machine is None:
            # Not running: settle whatever a previous run left started
            # (commit a dirty private, drop stale snapshots).
            self.disk_monitor.ensure_running()
            for vol in self.volumes(vm):
                if vol.is_dirty():
                    log.info("qube %s: settling volume %s left started by a previous run",
                             vm.name, vol.name)
                    try:
                        await vol.stop()
                    except QubesException as e:
                        log.error("qube %s: cannot settle volume %s: %s", vm.name, vol.name, e)
                else:
                    # A merge a previous daemon did not finish is picked up again.
                    schedule = getattr(vol.pool, "schedule_merge", None)
                    if schedule is not None and vol.config.save_on_stop \
                            and not vol.config.snap_on_start:
                        await schedule(vol)
            return False
        self.machines[vm.name] = machine
        self._watch_disk_errors(vm, machine)
        self._stopped[vm.name] = asyncio.get_running_loop().create_future()
        self._announce.add(vm.name)
        self.power.move(vm, Power.PAUSED if await machine.is_paused() else Power.RUNNING)
        # The agent says HELLO again when it sees dom0 reconnect; don't hold the daemon's start.
        # Its data disk, if it was started with one (the file stays while QEMU runs).
        data_path = datadisk.path_for(self.paths.run, vm.name)
        data_disk = None
        if data_path.exists():
            try:
                data_disk = datadisk.DataDisk(data_path)
            except OSError as e:
                log.warning("qube %s: cannot reopen its data disk: %s", vm.name, e)
        self.links[vm.name] = AgentLink(vm.name, str(machine.agent_socket),
                                        on_call=self._on_call, data_disk=data_disk)
        await self.network.adopt(vm)   # networking: its relay and links, kept running
        return True


def host_memory_kib(pid: int) -> int:
    """What a qube really holds on the host now (Qubes' MEM): its QEMU's proportional set
    size, the guest RAM it touched and did not give back plus QEMU's own, with the
    libraries every QEMU shares counted once across them.  0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wants_gui(vm: "QubesVM") -> bool:
    """Qubes' ``gui`` feature: this qube runs a GUI agent (its X server starts at boot)."""
    try:
        value = vm.features.get("gui", "")
    except AttributeError:
        return False
    return str(value) not in ("", "0", "False")


def volume_vid(vm: "QubesVM", name: str) -> str:
    """The volume id of ``vm``'s volume ``name`` in its pool (the qube class decides the layout)."""
    return vm.volume_vid(name)
