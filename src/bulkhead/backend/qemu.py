"""The local QEMU backend: one QEMU process per running qube, driven through QMP.

Each machine's runtime files live in ``paths.qube_run_dir(name)``::

    qmp.sock      QMP (QEMU is the server; the daemon connects, and reconnects after a restart)
    qrexec.sock   the guest agent's virtio-serial port
    console.sock  the serial console; the daemon copies it into a size-capped log
    qemu.pid      written by QEMU; with spec.json, how a new daemon finds machines to adopt
    spec.json     what was started, for re-adoption

QEMU runs in its own session, so a daemon that dies or restarts leaves its
machines running; the next daemon adopts them (:meth:`QemuBackend.adopt`).
Exits are noticed through a pidfd, which works for adopted machines that are
not our children too.  A machine that goes away after QMP reported
``SHUTDOWN`` stopped cleanly; one that vanishes without it crashed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError

from ..config import Paths
from ..errors import BackendError
from .accel import Accel, host_tsc_khz
from .base import Backend, ExitCallback, ExitReason, Machine, MachineSpec

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.qubes-os.qrexec"
CONSOLE_LOG_CAP = 1024 * 1024   # bytes of serial console kept per qube (guest output is hostile)
QMP_CONNECT_TIMEOUT = 10.0
# TCG's translated-code cache: QEMU's default (1 GiB reserved, filled as code runs)
# inflates every machine's RSS.  32 MiB was measured best here: 16 makes boots 40 %
# slower, 64 gains ~3 % for +35 MiB.  BULKHEAD_TCG_TB_SIZE_MIB overrides it (tuning).
TCG_TB_SIZE_MIB = int(os.environ.get("BULKHEAD_TCG_TB_SIZE_MIB", "32"))


class MachineState(enum.Enum):
    """Lifecycle of one QEMU process, as this daemon sees it."""

    LAUNCHING = "launching"
    RUNNING = "running"
    EXITED = "exited"


def kernel_cmdline(spec: MachineSpec, accel: Accel) -> str:
    """The kernel command line for a direct-boot (pvh) qube."""
    parts = [
        "console=ttyS0", "panic=-1", "quiet", "reboot=t",
        # Under TCG the guest cannot calibrate its TSC against the emulated PIT reliably.
        f"tsc_early_khz={host_tsc_khz()}", "tsc=reliable", "no_timer_check",
        # The qube kernel has no use for these; each costs boot time.
        "pty.legacy_count=0", "max_loop=0", "8250.nr_uarts=1",
        "root=/dev/vda", "rw", "rootfstype=ext4", "init=/usr/lib/bulkhead/init",
        f"bulkhead.name={spec.name}",
    ]
    if spec.vcpus > 1:
        # Bringing up the other vCPUs costs ~0.2-0.5 s of boot under TCG; the
        # guest agent onlines them once it has said HELLO, off the path
        # to agent-ready.
        parts.append("maxcpus=1")
    if spec.extra.get("resize_private") == "1":
        parts.append("bulkhead.resize_private=1")
    if spec.kernelopts:
        parts.append(spec.kernelopts)
    return " ".join(parts)


def _opt(path: Path | str) -> str:
    """A path inside QEMU's ``key=value,...`` options: commas are doubled."""
    return str(path).replace(",", ",,")


def build_argv(spec: MachineSpec, accel: Accel, run_dir: Path) -> list[str]:
    """QEMU's command line for ``spec``.  Every value here comes from dom0, never from a qube."""
    direct_boot = spec.kernel is not None and spec.virt_mode in ("pvh", "pv")
    argv = [QEMU, "-name", f"guest={spec.name},debug-threads=on"]
    if accel.name == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
    if direct_boot:
        # microvm: no PCI, no ACPI, no firmware; half the boot time of a PC under TCG.
        argv += ["-M", "microvm,pit=on,pic=on,rtc=on,acpi=off"]
        bus = "device"
    else:
        argv += ["-M", "q35"]
        bus = "pci"
    argv += [
        "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    if direct_boot:
        argv += ["-kernel", str(spec.kernel), "-append", kernel_cmdline(spec, accel)]
        if spec.initrd:
            argv += ["-initrd", str(spec.initrd)]
    for disk in spec.disks:
        opts = f"file={_opt(disk.path)},if=none,id={disk.name},format={disk.fmt},discard=unmap"
        if disk.readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts,
                 "-device", f"virtio-blk-{bus},drive={disk.name},serial={disk.name}"]
    argv += [
        "-device", f"virtio-serial-{bus}",
        "-chardev", f"socket,id=qrexec,path={_opt(run_dir / 'qrexec.sock')},server=on,wait=off",
        "-device", f"virtserialport,chardev=qrexec,name={AGENT_PORT}",
        # Without a hardware RNG, Python in the guest blocks seconds on the entropy pool.
        "-device", f"virtio-rng-{bus}",
        "-chardev", f"socket,id=console,path={_opt(run_dir / 'console.sock')},server=on,wait=off",
        "-serial", "chardev:console",
        "-qmp", f"unix:{_opt(run_dir / 'qmp.sock')},server=on,wait=off",
        "-pidfile", str(run_dir / "qemu.pid"),
    ]
    return argv


class QemuMachine(Machine):
    def __init__(self, backend: "QemuBackend", name: str, pid: int, run_dir: Path,
                 on_exit: ExitCallback, is_child: bool) -> None:
        self.backend = backend
        self.name = name
        self._pid = pid
        self.run_dir = run_dir
        self.on_exit = on_exit
        self.is_child = is_child
        self.state = MachineState.LAUNCHING
        self.qmp = QMPClient(name)
        self.saw_shutdown = False
        self.saw_panic = False
        self.killing = False
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
        return status.get("status") == "paused"

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
        self._tasks.append(asyncio.create_task(
            self.backend.copy_console(self.name, self.run_dir / "console.sock")))

    async def _follow_events(self, listener: EventListener) -> None:
        try:
            async for event in listener:
                if event["event"] == "SHUTDOWN":
                    self.saw_shutdown = True
                    self.saw_panic = self.saw_panic or event.get("data", {}).get("reason") == "guest-panic"
                elif event["event"] == "GUEST_PANICKED":
                    self.saw_panic = True
        except asyncio.CancelledError:
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
        log.info("qube %s: QEMU (pid %d) exited (%s%s)", self.name, self._pid, self.reason.value,
                 "" if status is None else f", status {status}")
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

    def describe(self) -> str:
        return f"QEMU ({QEMU}), acceleration: {self.accel.describe()}"

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
        for stale in ("qmp.sock", "qrexec.sock", "console.sock", "qemu.pid"):
            (run_dir / stale).unlink(missing_ok=True)
        argv = build_argv(spec, self.accel, run_dir)
        (run_dir / "spec.json").write_text(json.dumps({"name": spec.name, "qid": spec.qid,
                                                       "argv": argv}))
        qlog = self.qemu_log_path(spec.name)
        qlog.parent.mkdir(parents=True, exist_ok=True)
        self.console_log_path(spec.name).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(qlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            pid = os.posix_spawnp(
                QEMU, argv, os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)],
                setsid=True)
        except OSError as e:
            raise BackendError(f"cannot run {QEMU}: {e}; is qemu-system-x86 installed? "
                               "(`bulkhead setup` installs it)") from e
        finally:
            os.close(fd)
        machine = QemuMachine(self, spec.name, pid, run_dir, on_exit, is_child=True)
        self.machines[spec.name] = machine
        try:
            await machine.attach()
        except BaseException:
            await machine.kill()
            raise
        return machine

    async def adopt(self, name: str, on_exit: ExitCallback) -> Machine | None:
        run_dir = self.paths.qube_run_dir(name)
        try:
            pid = int((run_dir / "qemu.pid").read_text().strip())
            spec = json.loads((run_dir / "spec.json").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        # The pid could have been reused by an unrelated process: check it is our QEMU.
        if spec.get("name") != name or f"guest={name},debug-threads=on".encode() not in cmdline \
                or str(run_dir / "qmp.sock").encode() not in b" ".join(cmdline):
            return None
        try:
            machine = QemuMachine(self, name, pid, run_dir, on_exit, is_child=False)
        except ProcessLookupError:
            return None
        self.machines[name] = machine
        try:
            await machine.attach(timeout=3.0)
        except BackendError as e:
            log.warning("qube %s: found QEMU pid %d but cannot attach: %s; killing it", name, pid, e)
            await machine.kill()
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
