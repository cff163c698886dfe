"""QubesVM: a qube with a machine, its settings and its power operations.

Power operations go through ``app.lifecycle`` (a
:class:`bulkhead.lifecycle_api.Lifecycle`); the qube checks the request and
fires Qubes' events around each call:

=============  =============================================================
start          ``domain-pre-start`` (async, may veto), lifecycle.start,
               ``domain-start`` (``domain-start-failed`` on failure).  The
               netvm is started first if it is halted, as Qubes does.
shutdown       ``domain-pre-shutdown`` (``force``), lifecycle.shutdown
kill           lifecycle.kill
pause          ``domain-pre-paused``, lifecycle.pause, ``domain-paused``
unpause        ``domain-pre-unpaused``, lifecycle.unpause, ``domain-unpaused``
=============  =============================================================

``domain-shutdown`` is fired by the app when the lifecycle reports that the
machine went away (``LifecycleListener.domain_stopped``), whatever made it
go: a shutdown, a kill, a crash, the guest powering itself off.

Start holds ``lifecycle.start_lock(vm)`` (removal takes it too), so a qube
is never started twice at once nor removed while starting.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from ..backend.base import PowerState
from ..errors import (BackendError, QubesException, QubesPropertyValueError,
                      QubesVMNotFoundError, QubesVMNotPausedError, QubesVMNotRunningError,
                      QubesVMNotStartedError)
from ..events import handler
from ..properties import Property, VMProperty
from .base import BaseVM
from .net import NetVMMixin

if TYPE_CHECKING:  # pragma: no cover
    from ..lifecycle_api import Lifecycle
    from ..storage.pool import VolumeConfig

_USER_RE = re.compile(r"\A[a-z_][a-z0-9_-]{0,31}\Z")
_KERNEL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
VIRT_MODES = ("pvh", "hvm", "pv")


def default_with_template(prop: str, fallback: Any) -> Callable[[Any], Any]:
    """Default: the template's value if the qube has a template, else ``fallback``."""

    def default(vm: Any) -> Any:
        template = getattr(vm, "template", None)
        if template is not None:
            return getattr(template, prop)
        return fallback(vm) if callable(fallback) else fallback

    default.__name__ = f"default_{prop}"
    return default


def positive_int(holder: Any, prop: Property, value: int) -> int:
    if value <= 0:
        raise QubesPropertyValueError(holder, prop.name, value,
                                      f"Property {prop.name!r} must be a positive integer")
    return value


def non_negative_int(holder: Any, prop: Property, value: int) -> int:
    if value < 0:
        raise QubesPropertyValueError(holder, prop.name, value,
                                      f"Property {prop.name!r} must not be negative")
    return value


def setter_vcpus(holder: Any, prop: Property, value: int) -> int:
    if not 1 <= value <= 256:
        raise QubesPropertyValueError(holder, prop.name, value, "vcpus must be between 1 and 256")
    return value


def setter_virt_mode(holder: Any, prop: Property, value: str) -> str:
    value = value.lower()
    if value not in VIRT_MODES:
        raise QubesPropertyValueError(holder, prop.name, value,
                                      f"virt_mode must be one of {', '.join(VIRT_MODES)}")
    return value


def setter_kernel(holder: Any, prop: Property, value: str) -> str:
    """'' boots from the qube's own disk; anything else must be an installed kernel."""
    if value == "":
        return value
    if not _KERNEL_RE.match(value):
        raise QubesPropertyValueError(holder, prop.name, value, f"Invalid kernel name {value!r}")
    app = getattr(holder, "app", holder)
    installed = app.installed_kernels()
    if installed is not None and value not in installed:
        raise QubesPropertyValueError(holder, prop.name, value,
                                      f"Kernel {value!r} is not installed")
    return value


def setter_default_user(holder: Any, prop: Property, value: str) -> str:
    if not _USER_RE.match(value):
        raise QubesPropertyValueError(holder, prop.name, value, f"Invalid user name {value!r}")
    return value


def setter_default_dispvm(holder: Any, prop: Property, value: Any) -> Any:
    if value is not None and not getattr(value, "template_for_dispvms", False):
        raise QubesPropertyValueError(holder, prop.name, value.name,
                                      f"{value.name!r} is not a disposable template: "
                                      f"set its template_for_dispvms to True first")
    return value


class QubesVM(NetVMMixin, BaseVM):
    """Base of every qube that runs a machine (all classes but AdminVM)."""

    #: where the qube's volumes live in their pool: "appvms/NAME/root"
    volume_dir = "appvms"
    #: the volumes this class gets (see bulkhead.vm.volumes); set by each class
    volume_layout: Callable[..., dict[str, "VolumeConfig"]]

    autostart = Property(type=bool, default=False,
                         doc="Start the qube when the system starts.")
    debug = Property(type=bool, default=False,
                     doc="Debug mode: keep the console log verbose and the machine's "
                         "diagnostics on.")
    default_dispvm = VMProperty(
        vmclass=("AppVM", "StandaloneVM"), allow_none=True,
        default=lambda vm: vm.app.default_dispvm, setter=setter_default_dispvm,
        doc="The disposable template used when this qube asks for a disposable "
            "(qvm-open-in-dvm). Default: the global default_dispvm.")
    default_user = Property(default=default_with_template("default_user", "user"),
                            setter=setter_default_user,
                            doc="The user commands run as in the qube (qvm-run).")
    include_in_backups = Property(type=bool, default=True,
                                  doc="Include this qube in backups by default.")
    installed_by_rpm = Property(type=bool, default=False,
                                doc="The qube was installed by the package manager; it "
                                    "cannot be removed with qvm-remove.")
    kernel = Property(default=default_with_template("kernel", lambda vm: vm.app.default_kernel),
                      setter=setter_kernel,
                      doc="Kernel the qube boots (a directory of vm-kernels); empty to boot "
                          "the kernel on the qube's own disk. Default: the global "
                          "default_kernel.")
    kernelopts = Property(default=default_with_template("kernelopts", ""),
                          doc="Extra kernel command line options.")
    maxmem = Property(type=int, default=default_with_template("maxmem", 4000),
                      setter=non_negative_int,
                      doc="Maximum memory the qube may grow to, in MiB (0: fixed at memory).")
    memory = Property(type=int, default=default_with_template("memory", 400),
                      setter=positive_int,
                      doc="Memory the qube starts with, in MiB.")
    qrexec_timeout = Property(
        type=int, setter=positive_int,
        default=default_with_template("qrexec_timeout",
                                      lambda vm: vm.app.default_qrexec_timeout),
        doc="Seconds to wait for the qube's agent to answer after start before giving up.")
    shutdown_timeout = Property(
        type=int, setter=positive_int,
        default=default_with_template("shutdown_timeout",
                                      lambda vm: vm.app.default_shutdown_timeout),
        doc="Seconds to wait for a clean shutdown before the machine is killed.")
    updateable = Property(type=bool, read_only=True,
                          default=lambda vm: type(vm).updateable_class,
                          doc="True if changes to the root volume persist (templates and "
                              "standalone qubes).")
    vcpus = Property(type=int, default=default_with_template("vcpus", 2), setter=setter_vcpus,
                     doc="Number of virtual CPUs.")
    virt_mode = Property(default=default_with_template("virt_mode", "pvh"),
                         setter=setter_virt_mode,
                         doc="How the machine boots: pvh (dom0's kernel, paravirtual "
                             "devices), hvm (full emulation, its own firmware), pv.")

    def icon_name(self) -> str:
        family = "servicevm" if self.provides_network else self.icon_family
        try:
            color = self.label.name
        except AttributeError:
            color = "black"
        return f"{family}-{color}"

    def volume_vid(self, volume: str) -> str:
        """The volume's id in its pool: ``appvms/NAME/private``."""
        return f"{self.volume_dir}/{self.name}/{volume}"

    # --- memory rules, as Qubes has them -------------------------------------
    @handler("property-pre-set:memory")
    def _on_pre_set_memory(self, event: str, name: str, newvalue: int,
                           oldvalue: Any = None) -> None:
        maxmem = self.maxmem
        if maxmem and newvalue > maxmem:
            raise QubesPropertyValueError(self, name, newvalue,
                                          f"memory ({newvalue}) cannot be higher than "
                                          f"maxmem ({maxmem})")

    @handler("property-pre-set:maxmem")
    def _on_pre_set_maxmem(self, event: str, name: str, newvalue: int,
                           oldvalue: Any = None) -> None:
        if newvalue and newvalue < self.memory:
            raise QubesPropertyValueError(self, name, newvalue,
                                          f"maxmem ({newvalue}) cannot be lower than "
                                          f"memory ({self.memory})")

    # --- power ----------------------------------------------------------------
    def _lifecycle(self) -> "Lifecycle":
        lifecycle = self.app.lifecycle
        if lifecycle is None:
            raise QubesException("No VM backend is configured in this daemon")
        return lifecycle

    def get_power_state(self) -> str:
        lifecycle = self.app.lifecycle
        if lifecycle is None:
            return PowerState.HALTED.value
        return lifecycle.power_state(self).value

    async def _backend(self, what: str, coro: Any) -> None:
        """Await a lifecycle call; its non-Qubes errors become BackendError (a message
        the user sees, rather than an aborted connection)."""
        try:
            await coro
        except QubesException:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller, with the reason
            self.app.log.exception("%s of %s failed", what, self.name)
            raise BackendError(f"{what} of {self.name!r} failed: {exc}") from exc

    async def start(self) -> "QubesVM":
        lifecycle = self._lifecycle()
        async with lifecycle.start_lock(self):
            if self.app.domains.get(self.name) is not self:
                raise QubesVMNotFoundError(self.name)
            if not self.is_halted():
                return self  # Qubes: starting a started qube is not an error
            netvm = self.netvm
            if netvm is not None and netvm.is_halted():
                await netvm.start()
            await self.fire_event_async("domain-pre-start", pre_event=True)
            try:
                await self._backend("Start", lifecycle.start(self))
            except Exception as exc:
                self.fire_event("domain-start-failed", reason=str(exc))
                raise
            self.fire_event("domain-start")
        return self

    async def shutdown(self, force: bool = False, wait: bool = False,
                       timeout: float | None = None) -> None:
        lifecycle = self._lifecycle()
        if self.is_halted():
            raise QubesVMNotStartedError(self)
        await self.fire_event_async("domain-pre-shutdown", pre_event=True, force=force)
        if timeout is None:
            timeout = self.shutdown_timeout
        await self._backend("Shutdown", lifecycle.shutdown(self, force=force, wait=wait,
                                                           timeout=timeout))

    async def kill(self) -> None:
        lifecycle = self._lifecycle()
        if self.is_halted():
            raise QubesVMNotStartedError(self)
        await self._backend("Kill", lifecycle.kill(self))

    async def pause(self) -> None:
        lifecycle = self._lifecycle()
        if not self.is_running():
            raise QubesVMNotRunningError(self)
        await self.fire_event_async("domain-pre-paused", pre_event=True)
        await self._backend("Pause", lifecycle.pause(self))
        self.fire_event("domain-paused")

    async def unpause(self) -> None:
        lifecycle = self._lifecycle()
        if not self.is_paused():
            raise QubesVMNotPausedError(self)
        await self.fire_event_async("domain-pre-unpaused", pre_event=True)
        await self._backend("Unpause", lifecycle.unpause(self))
        self.fire_event("domain-unpaused")

    def current_state(self) -> dict[str, Any]:
        """What admin.vm.CurrentState reports (memory in KiB, cputime in ns)."""
        state = self.get_power_state()
        stats: dict[str, Any] = {}
        lifecycle = self.app.lifecycle
        # ``stats`` is an optional extension of the Lifecycle protocol.
        get_stats = getattr(lifecycle, "stats", None)
        if get_stats is not None and state != PowerState.HALTED.value:
            try:
                stats = dict(get_stats(self))
            except Exception:  # noqa: BLE001 - figures are informative only
                self.app.log.debug("stats of %s unavailable", self.name, exc_info=True)
        running = state not in (PowerState.HALTED.value, PowerState.CRASHED.value)
        return {
            "mem": int(stats.get("mem", self.memory * 1024 if running else 0)),
            "mem_static_max": int(stats.get("mem_static_max",
                                            max(self.maxmem, self.memory) * 1024)),
            "cputime": int(stats.get("cputime", 0)),
            "power_state": state,
        }
