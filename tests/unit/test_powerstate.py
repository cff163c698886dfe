"""The power-state machine: allowed moves, refused ones, and the errors operations raise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bulkhead.backend.base import PowerState
from bulkhead.errors import (QubesVMNotHaltedError, QubesVMNotPausedError,
                             QubesVMNotRunningError, QubesVMNotStartedError)
from bulkhead.powerstate import TRANSITIONS, Power, PowerStates, StateError

VM = SimpleNamespace(name="work")


def test_a_qube_nobody_started_is_halted():
    assert PowerStates().get("work") == Power.HALTED


def test_a_start_a_restore_and_a_stop():
    p = PowerStates()
    for state in (Power.STARTING, Power.RESTORING, Power.RUNNING, Power.PAUSED, Power.RUNNING,
                  Power.HALTING, Power.HALTED):
        p.move(VM, state)
        assert p.get("work") == state


@pytest.mark.parametrize("old,new", [(Power.HALTED, Power.HALTING),
                                     (Power.HALTING, Power.RUNNING),
                                     (Power.RESTORING, Power.PAUSED),
                                     (Power.HALTED, Power.CRASHED)])
def test_moves_the_table_does_not_allow_are_refused(old, new):
    p = PowerStates()
    p._state["work"] = old
    with pytest.raises(StateError, match=f"from {old.value} to {new.value}"):
        p.move(VM, new)
    assert p.get("work") == old


def test_every_state_has_a_way_back_to_halted():
    for state, moves in TRANSITIONS.items():
        if state != Power.HALTED:
            assert Power.HALTED in moves or Power.HALTING in moves, state


def test_qubes_names():
    assert Power.RESTORING.qubes == PowerState.TRANSIENT == Power.STARTING.qubes
    assert Power.CRASHED.qubes == PowerState.CRASHED


@pytest.mark.parametrize("state,allowed,error", [
    (Power.RUNNING, (Power.HALTED, Power.CRASHED), QubesVMNotHaltedError),
    (Power.HALTED, (Power.RUNNING,), QubesVMNotStartedError),
    (Power.PAUSED, (Power.RUNNING,), QubesVMNotRunningError),
    (Power.RUNNING, (Power.PAUSED,), QubesVMNotPausedError),
])
def test_operations_refuse_other_states_with_qubes_errors(state, allowed, error):
    p = PowerStates()
    p._state["work"] = state
    with pytest.raises(error):
        p.require(VM, allowed)
    assert p.require(VM, (state,)) == state
