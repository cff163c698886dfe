"""The interface between qubes and whatever runs their virtual machines.

The qube classes never talk to QEMU directly.  They describe a machine with a
:class:`MachineSpec` (configure), then ask the backend to act on it (start,
shut down, kill, pause) -- the same split Firecracker's API makes.  The local
QEMU backend (:mod:`bulkhead.backend.qemu`) is the one implementation today; a
libvirt backend for a remote host would implement this same interface without
touching the qube classes.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..errors import BackendError


class PowerState(enum.Enum):
    """Power states, named and spelt as Qubes reports them (``admin.vm.CurrentState``)."""

    HALTED = "Halted"
    TRANSIENT = "Transient"  # starting: QEMU runs, the guest agent has not yet said hello
    RUNNING = "Running"
    PAUSED = "Paused"
    HALTING = "Halting"
    DYING = "Dying"
    CRASHED = "Crashed"


@dataclass(frozen=True)
class DiskSpec:
    """One block device given to the machine, in Qubes' order (root, private, volatile...)."""

    name: str          # "root", "private", "volatile": also the virtio-blk serial the guest sees
    path: Path
    fmt: str = "qcow2"  # "qcow2" or "raw"
    readonly: bool = False


@dataclass(frozen=True)
class NicSpec:
    """One network device: a virtio-net on a descriptor dom0 made (see bulkhead.network).

    ``kind``: ``link`` (a tap in a namespace of its own: a link to another qube through
    dom0's VLAN relay, bulkhead.network.link), ``stream`` (a stream socket: passt) or
    ``tap`` (a tap device: sys-net's uplink)."""

    name: str
    mac: str
    fd: int
    kind: str = "link"


@dataclass(frozen=True)
class MachineSpec:
    """Everything a backend needs to start one qube's machine."""

    name: str
    qid: int
    memory_mib: int
    vcpus: int
    virt_mode: str                       # "pvh" (direct kernel boot) or "hvm" (firmware boots the disk)
    kernel: Path | None                  # the kernel image to boot directly; None: boot from disk
    kernelopts: str                      # extra kernel command line
    disks: tuple[DiskSpec, ...] = ()
    initrd: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    nics: tuple[NicSpec, ...] = ()


class ExitReason(enum.Enum):
    """Why a machine stopped."""

    SHUTDOWN = "shutdown"   # the guest shut itself down or reset (a clean stop)
    KILLED = "killed"       # dom0 killed it on purpose
    CRASHED = "crashed"     # QEMU died on its own or the guest kernel panicked


ExitCallback = Callable[[str, ExitReason], None]


class AgentLink(Protocol):
    """The dom0 end of a qube's guest-agent channel (see :mod:`bulkhead.guest.protocol`)."""

    async def wait_ready(self, timeout: float) -> None: ...


#: (device, reason, nospace): the machine paused because a disk write failed
BlockErrorCallback = Callable[[str, str, bool], None]


class Machine(abc.ABC):
    """A handle on one qube's running (or just started) virtual machine."""

    name: str
    #: told when a disk write fails and the machine pauses (a full host disk)
    on_block_error: BlockErrorCallback | None = None

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The machine process' pid on this host, if there is one."""

    @abc.abstractmethod
    def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def unpause(self) -> None: ...

    @abc.abstractmethod
    async def is_paused(self) -> bool: ...

    async def block_resize(self, device: str, size: int) -> None:
        """Grow the running machine's disk ``device`` to ``size`` bytes; the guest sees
        the new capacity at once."""
        raise BackendError(f"qube {self.name!r}: this backend cannot grow a disk while it runs")

    async def save_state(self, path: Path) -> int:
        """Stop the machine and write its state to ``path`` (a saved boot state)."""
        raise BackendError(f"qube {self.name!r}: this backend cannot save a machine's state")

    async def restore_state(self, path: Path) -> None:
        """Load the state saved in ``path`` into this machine, started to receive one
        (``extra["boot_state"] = "restore"``); it stays stopped until :meth:`unpause`."""
        raise BackendError(f"qube {self.name!r}: this backend cannot restore a saved state")

    @abc.abstractmethod
    async def power_button(self) -> None:
        """Ask the guest's firmware/kernel to shut down (ACPI); a fallback after the agent."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the machine at once; returns when it is gone."""

    @abc.abstractmethod
    async def wait_exit(self) -> ExitReason:
        """Wait until the machine is gone and say why it went."""

    @property
    @abc.abstractmethod
    def agent_socket(self) -> Path:
        """Unix socket of the guest agent's virtio-serial port (dom0 connects to it)."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path: ...


class Backend(abc.ABC):
    """Runs machines.  One instance per daemon."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for ``bulkhead info``: engine, acceleration and why."""

    @abc.abstractmethod
    async def start(self, spec: MachineSpec, on_exit: ExitCallback) -> Machine:
        """Launch a machine for ``spec``; returns once the process runs (not once the guest is up).

        ``on_exit`` is called (in the event loop) once the machine is gone, however it went.
        """

    @abc.abstractmethod
    async def adopt(self, name: str, on_exit: ExitCallback) -> Machine | None:
        """Find a machine for qube ``name`` left running by a previous daemon, or None."""
