"""The local QEMU backend: one QEMU process per running qube, driven through QMP.

Each machine's runtime files live in ``paths.qube_run_dir(name)`` (root's alone)::

    qmp.sock      QMP (QEMU is the server; the daemon connects, and reconnects after a restart)
    qrexec.sock   the guest agent's virtio-serial port
    console.sock  the serial console; the daemon copies it into a size-capped log
    gui.sock      the GUI agent's virtio-serial port (handed to the user's GUI daemon)
    qemu.pid      QEMU's pid on the host; with spec.json, how a new daemon finds machines to adopt
    spec.json     what was started, for re-adoption

The daemon makes the three sockets itself (bound and listening, mode 0600)
and hands them to QEMU as file descriptors: QEMU, which runs jailed under a
uid of its own (:mod:`bulkhead.backend.jail`) and in a cgroup with limits
(:mod:`bulkhead.backend.cgroup`), needs no access to this directory at all.

QEMU runs in its own session, so a daemon that dies or restarts leaves its
machines running; the next daemon adopts them (:meth:`QemuBackend.adopt`).
Exits are noticed through a pidfd, which works for adopted machines that are
not our children too.

How an exit is classified: a qube's clean poweroff ends in a reset (the guest
kernel reboots with ``reboot=t``, QEMU runs with ``-no-reboot``); so does a
kernel panic (``panic=-1``).  QMP's ``SHUTDOWN`` says ``guest-reset`` for both
(measured), and microvm has no ACPI for a pvpanic device to be found by.  What
differs is the BIOS reboot flag the kernel writes at 0x472 before it resets:
with ``reboot=panic_warm`` a panic writes 0x1234 (warm), a clean reboot 0.  So
QEMU runs with ``-action shutdown=pause``: at the guest's reset it stops
instead of exiting, dom0 reads the flag through QMP, then tells it to quit.
A machine that goes away after such a clean ``SHUTDOWN`` stopped cleanly; one
that panicked, or vanished without it (killed by the kernel for going over its
memory limit, say), crashed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError

from ..config import Paths
from ..errors import BackendError
from . import cgroup, jail, thp
from .accel import Accel
from .base import Backend, ExitCallback, ExitReason, Machine, MachineSpec
from .qemu_argv import QEMU, build_argv, is_direct_boot

log = logging.getLogger(__name__)

CONSOLE_LOG_CAP = 1024 * 1024   # bytes of serial console kept per qube (guest output is hostile)
QMP_CONNECT_TIMEOUT = 10.0
SOCKETS = ("qmp", "qrexec", "console", "gui")   # each ``<name>.sock`` in the run directory
#: QEMU's whole environment: nothing of the daemon's leaks into it.
QEMU_ENV = {"PATH": "/usr/bin:/bin"}
#: The kernel's BIOS reboot flag (phys. 0x472) after a panic with ``reboot=panic_warm``.
PANIC_REBOOT_FLAG = "0x1234"
#: Joins the cgroups named before ``--`` (``0``: the writer itself), then runs the rest.
JOIN_CGROUPS = ('while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; '
                'shift; exec "$@"')


class MachineState(enum.Enum):
    """Lifecycle of one QEMU process, as this daemon sees it."""

    LAUNCHING = "launching"
    RUNNING = "running"
    EXITED = "exited"


class QemuMachine(Machine):
    def __init__(self, backend: "QemuBackend", name: str, pid: int, run_dir: Path,
                 on_exit: ExitCallback, is_child: bool, *, direct_boot: bool = True,
                 cgroup: "cgroup.QubeCgroup | None" = None) -> None:
        self.backend = backend
        self.name = name
        self._pid = pid
        self.run_dir = run_dir
        self.on_exit = on_exit
        self.is_child = is_child
        self.direct_boot = direct_boot
        self.cgroup = cgroup
        self.state = MachineState.LAUNCHING
        self.qmp = QMPClient(name)
        self.saw_shutdown = False
        self.saw_panic = False
        self.killing = False
        self.settling = False
        self.reason: ExitReason | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._process_gone)
        self._tasks: list[asyncio.Task[Any]] = []

    # --- Machine interface -------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._pid if self.state != MachineState.EXITED else None

    def is_alive(self) -> bool:
        return self.state != MachineState.EXITED

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "qrexec.sock"

    @property
    def console_log(self) -> Path:
        return self.backend.console_log_path(self.name)

    async def _qmp(self, cmd: str, **args: Any) -> Any:
        if self.state != MachineState.RUNNING:
            raise BackendError(f"qube {self.name!r}: its QEMU is not running (state {self.state.value})")
        try:
            return await self.qmp.execute(cmd, args or None)
        except QMPError as e:
            raise BackendError(f"qube {self.name!r}: QMP command {cmd} failed: {e}") from e

    async def pause(self) -> None:
        await self._qmp("stop")

    async def unpause(self) -> None:
        await self._qmp("cont")

    async def is_paused(self) -> bool:
        status = await self._qmp("query-status")
        # "io-error": paused by werror=enospc (a full disk), resumed by `cont` as well.
        return status.get("status") in ("paused", "io-error")

    async def block_resize(self, device: str, size: int) -> None:
        await self._qmp("block_resize", device=device, size=size)

    # --- saved boot states (see bulkhead.bootstate) ------------------------------
    async def save_state(self, path: Path) -> int:
        """Stop the guest and write its whole state to ``path`` (QEMU's migration stream,
        through a descriptor dom0 opened: the jailed QEMU cannot open files).  The
        machine stays stopped; the caller kills it.  Returns the file's size."""
        await self._qmp("stop")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._pass_fd(fd, "boot-state")
        finally:
            os.close(fd)
        # QEMU's default cap (128 MiB/s) is for live migration over a network.
        await self._qmp("migrate-set-parameters", **{"max-bandwidth": 64 * 2**30})
        await self._qmp("migrate", uri="fd:boot-state")
        await self._wait_migration("saving")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return path.stat().st_size

    async def restore_state(self, path: Path) -> None:
        """Load a saved state into this machine, started with ``-incoming defer``, and
        leave it stopped (the caller points its disks, then continues it)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._pass_fd(fd, "boot-state")
        finally:
            os.close(fd)
        await self._qmp("migrate-incoming", uri="fd:boot-state")
        await self._wait_migration("restoring")

    async def _pass_fd(self, fd: int, name: str) -> None:
        if self.state != MachineState.RUNNING:
            raise BackendError(f"qube {self.name!r}: its QEMU is not running")
        try:
            self.qmp.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise BackendError(f"qube {self.name!r}: cannot pass a file to QEMU: {e}") from e
        await self._qmp("getfd", fdname=name)

    async def _wait_migration(self, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = await self._qmp("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BackendError(f"qube {self.name!r}: {what} its state failed: "
                                   f"{str(info.get('error-desc', status))[:300]}")
            if time.monotonic() > deadline:
                raise BackendError(f"qube {self.name!r}: {what} its state took over {timeout:.0f} s")
            await asyncio.sleep(0.005)

    async def _follow_disk_errors(self, listener: EventListener) -> None:
        """BLOCK_IO_ERROR with action "stop": the machine paused on a full disk."""
        try:
            async for event in listener:
                data = event.get("data", {})
                if not isinstance(data, dict) or data.get("action") != "stop":
                    continue
                callback = self.on_block_error
                if callback is not None:
                    callback(str(data.get("device", ""))[:64], str(data.get("reason", ""))[:200],
                             bool(data.get("nospace", False)))
        except asyncio.CancelledError:
            pass

    async def power_button(self) -> None:
        await self._qmp("system_powerdown")

    async def kill(self) -> None:
        if self.state == MachineState.EXITED:
            return
        self.killing = True
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.wait_exit()

    async def wait_exit(self) -> ExitReason:
        return await asyncio.shield(self._exited)

    # --- plumbing --------------------------------------------------------------
    async def attach(self, timeout: float = QMP_CONNECT_TIMEOUT) -> None:
        """Connect QMP (retrying while QEMU creates its socket) and follow its events."""
        deadline = time.monotonic() + timeout
        sock = str(self.run_dir / "qmp.sock")
        while True:
            if self.state == MachineState.EXITED:
                raise BackendError(self.backend.launch_failure(self.name))
            try:
                if not os.path.exists(sock):  # not created yet: don't let qemu.qmp log a failure
                    raise ConnectError("QMP socket not created yet", FileNotFoundError(sock))
                await self.qmp.connect(sock)
                break
            except ConnectError as e:
                if time.monotonic() > deadline:
                    raise BackendError(f"qube {self.name!r}: cannot connect to QEMU's monitor "
                                       f"at {sock}: {e}") from e
                await asyncio.sleep(0.01)
        if self.state == MachineState.LAUNCHING:
            self.state = MachineState.RUNNING
        listener = EventListener(("SHUTDOWN", "GUEST_PANICKED"))
        self.qmp.register_listener(listener)
        self._tasks.append(asyncio.create_task(self._follow_events(listener)))
        disk_errors = EventListener(("BLOCK_IO_ERROR",))
        self.qmp.register_listener(disk_errors)
        self._tasks.append(asyncio.create_task(self._follow_disk_errors(disk_errors)))
        self._tasks.append(asyncio.create_task(
            self.backend.copy_console(self.name, self.run_dir / "console.sock")))

    async def _follow_events(self, listener: EventListener) -> None:
        try:
            async for event in listener:
                if event["event"] == "SHUTDOWN":
                    data = event.get("data", {})
                    if self.settling:
                        continue   # our own ``quit``, after the guest's shutdown
                    self.saw_shutdown = True
                    self.saw_panic = self.saw_panic or data.get("reason") == "guest-panic"
                    # Only `quit` and a signal make QEMU exit by itself; on anything
                    # else (the guest's reset or poweroff, a host error) it stops.
                    if data.get("reason") not in ("host-qmp-quit", "host-signal"):
                        self.settling = True
                        self._tasks.append(asyncio.create_task(self.settle()))
                elif event["event"] == "GUEST_PANICKED":
                    self.saw_panic = True
        except asyncio.CancelledError:
            pass

    async def settle(self) -> None:
        """The guest went and QEMU stopped (``-action shutdown=pause``): see whether the
        guest kernel panicked, then let QEMU exit."""
        self.settling = True
        try:
            if self.direct_boot:
                flag = await self.qmp.execute("human-monitor-command",
                                              {"command-line": "xp /1hx 0x472"})
                if isinstance(flag, str) and flag.strip().endswith(PANIC_REBOOT_FLAG):
                    self.saw_panic = True
            await self.qmp.execute("quit")
        except (QMPError, OSError, EOFError) as e:
            if self.state == MachineState.EXITED:
                return
            log.warning("qube %s: cannot ask the stopped QEMU to quit (%s); terminating it",
                        self.name, e)
            try:
                os.kill(self._pid, signal.SIGTERM)   # QEMU exits at once, as on `quit`
            except ProcessLookupError:
                pass

    def _process_gone(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        status = None
        if self.is_child:
            try:
                _, raw = os.waitpid(self._pid, os.WNOHANG)
                status = os.waitstatus_to_exitcode(raw)
            except ChildProcessError:
                pass
        if self.killing:
            self.reason = ExitReason.KILLED
        elif self.saw_shutdown and not self.saw_panic:
            self.reason = ExitReason.SHUTDOWN
        else:
            self.reason = ExitReason.CRASHED
        why = ""
        if self.saw_panic:
            why = ", the guest kernel panicked"
        elif self.cgroup is not None and self.cgroup.oom_kills():
            why = ", killed by the kernel for going over its memory limit"
        log.info("qube %s: QEMU (pid %d) exited (%s%s%s)", self.name, self._pid, self.reason.value,
                 "" if status is None else f", status {status}", why)
        if self.cgroup is not None:
            self.backend.remove_cgroup_later(self.cgroup)
        self.state = MachineState.EXITED
        for t in self._tasks:
            t.cancel()
        asyncio.ensure_future(self._disconnect())
        self.backend.forget(self)
        self._exited.set_result(self.reason)
        self.on_exit(self.name, self.reason)

    async def _disconnect(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:  # noqa: BLE001 -- the peer is gone; nothing to save
            pass


class QemuBackend(Backend):
    def __init__(self, paths: Paths, accel: Accel) -> None:
        self.paths = paths
        self.accel = accel
        self.machines: dict[str, QemuMachine] = {}
        self.jailed = jail.enabled()
        self.cgroups = cgroup.detect()
        if self.cgroups is None:
            log.warning("no usable cgroup controllers (memory, pids, cpu): qubes' QEMUs "
                        "run without resource limits")
        else:
            self.cgroups.collect_stale(self.paths.run.parent)
        self._slot: int | None = None
        self._cgroup_generation: dict[Path, int] = {}   # cgroup -> starts that made it

    def describe(self) -> str:
        how = "jailed" if self.jailed else "NOT jailed (BULKHEAD_JAIL=0)"
        limits = (f"cgroup {'v2' if self.cgroups.v2 else 'v1'}" if self.cgroups
                  else "no cgroup limits")
        return f"QEMU ({QEMU}, {how}, {limits}), acceleration: {self.accel.describe()}"

    @property
    def instance(self) -> str:
        """This daemon's name among others on the host (its run directory's)."""
        return self.paths.run.name

    def jail_for(self, spec: MachineSpec) -> jail.Jail:
        """The qube's jail: its uid and gid from this instance's block of the range."""
        ids = jail.read_range()
        if self._slot is None:
            self._slot = jail.instance_slot(self.paths.home, ids.count)
        uid = ids.ids_for(self._slot, spec.qid)
        return jail.Jail(uid=uid, gid=uid, kvm=self.accel.name == "kvm")

    def _give_files(self, spec: MachineSpec, j: jail.Jail) -> tuple[list[Path], list[Path]]:
        """Own the images QEMU writes to the qube's uid, let it read those below them;
        returns (read-only, writable) files for the jail."""
        ro: list[Path] = [p for p in (spec.kernel, spec.initrd) if p is not None]
        rw: list[Path] = []
        for disk in spec.disks:
            if disk.readonly:
                jail.grant_read(disk.path, j.uid)
                ro.append(disk.path)
            else:
                jail.give(disk.path, j.uid, j.gid)
                rw.append(disk.path)
            for below in jail.backing_chain(disk.path, disk.fmt):
                jail.grant_read(below, j.uid)
                if below not in ro:
                    ro.append(below)
        return ro, rw

    def _listen(self, run_dir: Path) -> dict[str, socket.socket]:
        """QEMU's sockets, made here so that they are root's, mode 0600."""
        out: dict[str, socket.socket] = {}
        old = os.umask(0o177)
        try:
            for name in SOCKETS:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                out[name] = s
                s.bind(str(run_dir / f"{name}.sock"))
                s.listen(4)
        except OSError:
            for s in out.values():
                s.close()
            raise
        finally:
            os.umask(old)
        return out

    def remove_cgroup_later(self, cg: "cgroup.QubeCgroup") -> None:
        """Remove a gone QEMU's cgroup once the jail's monitor process left it too --
        unless the qube started again meanwhile (a restored start takes a fraction of
        a second): its new QEMU has the same cgroup."""
        generation = self._cgroup_generation.get(cg.memory_dir, 0)

        async def remove() -> None:
            for _ in range(50):
                if all(not f.exists() or not f.read_text().strip() for f in cg.procs_files):
                    break
                await asyncio.sleep(0.1)
            if self._cgroup_generation.get(cg.memory_dir, 0) == generation:
                cg.remove()
        asyncio.ensure_future(remove())

    def _reap(self, pid: int) -> None:
        """Collect a child (the jail's monitor, which outlives QEMU by an instant) when it exits."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        loop.add_reader(fd, gone)

    def console_log_path(self, name: str) -> Path:
        return self.paths.log_dir / "console" / f"{name}.log"

    def qemu_log_path(self, name: str) -> Path:
        return self.paths.log_dir / "qemu" / f"{name}.log"

    def launch_failure(self, name: str) -> str:
        try:
            tail = self.qemu_log_path(name).read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        detail = "; ".join(tail) or "no message"
        return (f"qube {name!r}: QEMU exited during start-up: {detail} "
                f"(full log: {self.qemu_log_path(name)})")

    async def start(self, spec: MachineSpec, on_exit: ExitCallback) -> Machine:
        if spec.name in self.machines:
            raise BackendError(f"qube {spec.name!r} already has a running QEMU")
        run_dir = self.paths.qube_run_dir(spec.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        # QMP and the agent's port are full control of a qube: root's alone.
        os.chmod(self.paths.run, 0o700)
        os.chmod(run_dir, 0o700)
        for stale in ("qmp.sock", "qrexec.sock", "console.sock", "gui.sock", "qemu.pid"):
            (run_dir / stale).unlink(missing_ok=True)
        try:
            j = self.jail_for(spec) if self.jailed else None
            files = self._give_files(spec, j) if j is not None else None
        except (jail.JailError, OSError) as e:
            raise BackendError(f"qube {spec.name!r}: cannot set up its jail: {e}") from e
        cg = None
        if self.cgroups is not None:
            try:
                cg = self.cgroups.create(self.instance, spec.name,
                                         cgroup.limits_for(spec.memory_mib))
                self._cgroup_generation[cg.memory_dir] = \
                    self._cgroup_generation.get(cg.memory_dir, 0) + 1
            except (cgroup.CgroupError, OSError) as e:
                raise BackendError(f"qube {spec.name!r}: cannot make its cgroup: {e}") from e
        listeners = self._listen(run_dir)
        fds = {name: s.fileno() for name, s in listeners.items()}
        argv = build_argv(spec, self.accel, run_dir, fds)
        info_r = info_w = -1
        cmd = argv
        if j is not None and files is not None:
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            cmd = j.command(argv, ro_files=files[0], rw_files=files[1], pid_dir=run_dir,
                            info_fd=info_w)
        if cg is not None:
            cmd = ["/bin/sh", "-c", JOIN_CGROUPS, "sh", *map(str, cg.procs_files), "--", *cmd]
        (run_dir / "spec.json").write_text(json.dumps({
            "name": spec.name, "qid": spec.qid, "argv": argv, "direct_boot": is_direct_boot(spec),
            "uid": j.uid if j is not None else None}))
        qlog = self.qemu_log_path(spec.name)
        qlog.parent.mkdir(parents=True, exist_ok=True)
        self.console_log_path(spec.name).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(qlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        inherited = [*fds.values()] + ([info_w] if info_w >= 0 else [])
        inherited += [nic.fd for nic in spec.nics]   # network links (bulkhead.network)
        try:
            for i in inherited:
                os.set_inheritable(i, True)
            # QEMU gets nothing of the daemon's environment: only what it needs.
            with thp.disabled_for_children(self.accel.name != "kvm"):
                spawned = os.posix_spawnp(
                    cmd[0], cmd, QEMU_ENV,
                    file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                  (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)],
                    setsid=True)
        except OSError as e:
            if info_r >= 0:
                os.close(info_r)
            raise BackendError(f"cannot run {cmd[0]}: {e}; is qemu-system-x86 (and bubblewrap) "
                               "installed? (`bulkhead setup` installs them)") from e
        finally:
            os.close(fd)
            for s in listeners.values():
                s.close()   # QEMU holds them now; the paths stay for dom0 to connect to
            for nic in spec.nics:
                # Never into a later QEMU: a link's end is this qube's alone.
                os.set_inheritable(nic.fd, False)
            if info_w >= 0:
                os.close(info_w)
        pid = spawned
        if info_r >= 0:
            self._reap(spawned)
            try:
                pid = await self._jailed_pid(info_r)
            except BackendError as e:
                if cg is not None:
                    self.remove_cgroup_later(cg)
                raise BackendError(f"{e}: {self.launch_failure(spec.name)}") from None
            finally:
                os.close(info_r)
        (run_dir / "qemu.pid").write_text(f"{pid}\n")
        try:
            machine = QemuMachine(self, spec.name, pid, run_dir, on_exit, is_child=pid == spawned,
                                  direct_boot=is_direct_boot(spec), cgroup=cg)
        except ProcessLookupError:
            raise BackendError(self.launch_failure(spec.name)) from None
        self.machines[spec.name] = machine
        try:
            await machine.attach()
            # A guest that went before QMP followed its events (a very early panic)
            # would wait, stopped, for a SHUTDOWN nobody saw.
            status = await machine._qmp("query-status")
            if isinstance(status, dict) and status.get("status") == "shutdown" \
                    and not machine.settling:
                machine.saw_shutdown = True
                await machine.settle()
        except BaseException:
            await machine.kill()
            raise
        return machine

    async def _jailed_pid(self, info_r: int) -> int:
        """QEMU's pid on the host, from bwrap's ``--info-fd`` (QEMU is PID 1 inside)."""
        loop = asyncio.get_running_loop()
        data = b""
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        os.set_blocking(info_r, False)
        while b"}" not in data:
            ready: asyncio.Future[None] = loop.create_future()
            # The reader may fire again before this coroutine runs and removes it.
            loop.add_reader(info_r, lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BackendError("the jail did not say which process QEMU is") from None
            finally:
                loop.remove_reader(info_r)
            try:
                chunk = os.read(info_r, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
        try:
            return int(json.loads(data.decode())["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise BackendError("the jail failed before QEMU ran") from None

    async def adopt(self, name: str, on_exit: ExitCallback) -> Machine | None:
        run_dir = self.paths.qube_run_dir(name)
        try:
            pid = int((run_dir / "qemu.pid").read_text().strip())
            spec = json.loads((run_dir / "spec.json").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            uids = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:")][0].split()[1:]
        except (OSError, ValueError, IndexError):
            return None
        # The pid could have been reused by an unrelated process: check it is our QEMU
        # (its command line names this instance's run directory; jailed, its uid is the qube's).
        if spec.get("name") != name or f"guest={name},debug-threads=on".encode() not in cmdline \
                or str(run_dir / "qemu.pid").encode() not in cmdline:
            return None
        if spec.get("uid") is not None and any(u != str(spec["uid"]) for u in uids):
            return None
        cg = self.cgroups.group(self.instance, name) if self.cgroups is not None else None
        try:
            machine = QemuMachine(self, name, pid, run_dir, on_exit, is_child=False,
                                  direct_boot=bool(spec.get("direct_boot", True)), cgroup=cg)
        except ProcessLookupError:
            return None
        self.machines[name] = machine
        try:
            await machine.attach(timeout=3.0)
            status = await machine.qmp.execute("query-status")
        except (BackendError, QMPError) as e:
            log.warning("qube %s: found QEMU pid %d but cannot attach: %s; killing it", name, pid, e)
            await machine.kill()
            return None
        if isinstance(status, dict) and status.get("status") == "shutdown":
            # The guest went while no daemon watched: let QEMU go; nothing to adopt.
            machine.on_exit = lambda _name, _reason: None
            machine.saw_shutdown = True
            await machine.settle()
            await machine.wait_exit()
            return None
        log.info("qube %s: adopted running QEMU (pid %d)", name, pid)
        return machine

    def forget(self, machine: QemuMachine) -> None:
        if self.machines.get(machine.name) is machine:
            del self.machines[machine.name]

    async def copy_console(self, name: str, sock: Path) -> None:
        """Copy the guest's serial console into a log capped at CONSOLE_LOG_CAP.

        The guest writes whatever it likes there, so it is stored, never parsed,
        and bounded: when the log is full it becomes ``.old`` and a new one starts.
        """
        path = self.console_log_path(name)
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
        except OSError:
            return
        try:
            f = open(path, "ab")
            try:
                while chunk := await reader.read(65536):
                    if f.tell() + len(chunk) > CONSOLE_LOG_CAP:
                        f.close()
                        os.replace(path, path.with_suffix(".log.old"))
                        f = open(path, "ab")
                    f.write(chunk)
                    f.flush()
            finally:
                f.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
