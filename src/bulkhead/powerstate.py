"""A qube's power state: one explicit state per qube, and the moves allowed between them.

Modelled on ``qemu.qmp``'s ``Runstate``: the lifecycle keeps exactly one
:class:`Power` per qube (absent means halted), every change goes through
:meth:`PowerStates.move`, which refuses a move the table does not allow (a bug
in dom0, logged and raised), and each operation states the states it accepts
with :meth:`PowerStates.require`, which refuses the others with the error
Qubes' clients expect (``QubesVMNotHaltedError``, ``QubesVMNotRunningError``...).

Qubes reports fewer states than dom0 tracks: starting and restoring are both
``Transient``; a preloaded disposable is ``Paused`` (its ``preload-dispvm*``
features say the rest, as in Qubes 4.3).
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Iterable

from .backend.base import PowerState
from .errors import (QubesVMError, QubesVMNotHaltedError, QubesVMNotPausedError,
                     QubesVMNotRunningError, QubesVMNotStartedError)

log = logging.getLogger(__name__)


class Power(enum.Enum):
    HALTED = "halted"
    STARTING = "starting"      # volumes started, QEMU launched, the kernel boots
    RESTORING = "restoring"    # QEMU loads a saved boot state; the qube's own boot follows
    RUNNING = "running"
    PAUSED = "paused"          # by qvm-pause, a full disk, or a preload waiting to be taken
    HALTING = "halting"        # asked to stop; killed at its shutdown_timeout
    CRASHED = "crashed"        # its QEMU died, or its kernel panicked

    @property
    def qubes(self) -> PowerState:
        """The state as Qubes names it (``admin.vm.CurrentState``, ``qvm-ls``)."""
        return _QUBES[self]


_QUBES = {
    Power.HALTED: PowerState.HALTED, Power.STARTING: PowerState.TRANSIENT,
    Power.RESTORING: PowerState.TRANSIENT, Power.RUNNING: PowerState.RUNNING,
    Power.PAUSED: PowerState.PAUSED, Power.HALTING: PowerState.HALTING,
    Power.CRASHED: PowerState.CRASHED,
}

#: the moves allowed; anything else is a bug in dom0
TRANSITIONS: dict[Power, frozenset[Power]] = {
    # Running or paused straight from halted: a machine a previous daemon left, adopted.
    Power.HALTED: frozenset({Power.STARTING, Power.RESTORING, Power.RUNNING, Power.PAUSED}),
    Power.CRASHED: frozenset({Power.STARTING, Power.RESTORING, Power.HALTED}),
    # A start that fails goes back to halted (or crashed, if its QEMU died).
    Power.STARTING: frozenset({Power.RESTORING, Power.RUNNING, Power.HALTED, Power.CRASHED}),
    Power.RESTORING: frozenset({Power.RUNNING, Power.HALTED, Power.CRASHED}),
    Power.RUNNING: frozenset({Power.PAUSED, Power.HALTING, Power.HALTED, Power.CRASHED}),
    Power.PAUSED: frozenset({Power.RUNNING, Power.HALTING, Power.HALTED, Power.CRASHED}),
    Power.HALTING: frozenset({Power.HALTED, Power.CRASHED}),
}

#: states in which a qube has a machine (QEMU runs, maybe stopped)
ACTIVE = frozenset({Power.STARTING, Power.RESTORING, Power.RUNNING, Power.PAUSED, Power.HALTING})


class StateError(QubesVMError):
    """A move the table does not allow: a bug in dom0, never the user's doing."""


class PowerStates:
    """The power state of every qube of one lifecycle."""

    def __init__(self) -> None:
        self._state: dict[str, Power] = {}

    def get(self, name: str) -> Power:
        return self._state.get(name, Power.HALTED)

    def move(self, vm: Any, new: Power) -> Power:
        """Change ``vm``'s state to ``new``; returns the old one."""
        name = vm if isinstance(vm, str) else vm.name
        old = self.get(name)
        if old == new:
            return old
        if new not in TRANSITIONS[old]:
            log.error("qube %s: refused power state change %s -> %s", name, old.value, new.value)
            raise StateError(vm if not isinstance(vm, str) else None,
                             f"qube {name!r}: cannot go from {old.value} to {new.value}")
        if new == Power.HALTED:
            self._state.pop(name, None)
        else:
            self._state[name] = new
        return old

    def forget(self, name: str) -> None:
        """The qube was removed (or renamed): nothing of its state remains."""
        self._state.pop(name, None)

    def require(self, vm: Any, allowed: Iterable[Power]) -> Power:
        """``vm``'s state if it is one of ``allowed``, else the error Qubes' clients expect."""
        state = self.get(vm.name)
        allowed = frozenset(allowed)
        if state in allowed:
            return state
        if state in ACTIVE and not allowed & ACTIVE:
            raise QubesVMNotHaltedError(vm)
        if allowed == {Power.PAUSED}:
            raise QubesVMNotPausedError(vm)
        if state not in ACTIVE:
            raise QubesVMNotStartedError(vm)
        raise QubesVMNotRunningError(vm)
