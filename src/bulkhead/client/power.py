"""Waiting for qubes to halt, for qvm-shutdown --wait (and anything else that must).

The daemon announces every stop with a ``domain-shutdown`` event on
``admin.Events``.  We subscribe first, and only once the daemon confirms the
subscription (``connection-established``) look at the current states: a qube
that halts in between is then either already seen halted or announced by an
event, never missed.  A daemon without events still works: we poll.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable

from .. import errors

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .vm import VM

POLL_INTERVAL = 0.5
#: events after which a qube may have halted (re-check its state)
STOP_EVENTS = frozenset({"domain-shutdown", "domain-stopped", "domain-shutdown-failed"})


def is_halted(vm: "VM") -> bool:
    """Halted, or gone (a disposable is removed when it stops)."""
    try:
        return vm.current_state().get("power_state", "NA") in ("Halted", "NA")
    except errors.QubesVMNotFoundError:
        return True


def wait_until_halted(app: "App", vms: Iterable["VM"], timeout: float,
                      commit_failures: dict[str, str] | None = None) -> list["VM"]:
    """Wait up to ``timeout`` seconds for ``vms`` to halt; returns those still not halted.

    ``commit_failures`` gets, per qube, the daemon's line on a stop whose changes
    could not be committed (event ``domain-commit-failed``, sent before the stop's)."""
    pending = list(vms)
    deadline = time.monotonic() + timeout
    if not pending:
        return []
    try:
        with app.events() as stream:
            established = stream.next(timeout)
            if established is None:
                return _poll(pending, deadline)
            pending = [vm for vm in pending if not is_halted(vm)]
            names = {vm.name for vm in pending}
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                event = stream.next(remaining)
                if event is None:
                    break
                if event.subject in names and event.name == "domain-commit-failed" \
                        and commit_failures is not None:
                    commit_failures[event.subject] = event.kwargs.get("message", "")
                if event.subject in names and event.name in STOP_EVENTS:
                    pending = [vm for vm in pending
                               if vm.name != event.subject or not is_halted(vm)]
            return pending
    except errors.QubesException:
        # no event stream (or it broke): fall back to asking
        return _poll(pending, deadline)


def _poll(pending: list["VM"], deadline: float) -> list["VM"]:
    while True:
        pending = [vm for vm in pending if not is_halted(vm)]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
