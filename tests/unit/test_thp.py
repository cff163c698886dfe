"""bulkhead.backend.thp: what is spawned inside the block has THP off, and the
daemon's own setting comes back afterwards."""

from __future__ import annotations

import subprocess

from bulkhead.backend import thp


def _child_thp() -> str:
    out = subprocess.run(["grep", "THP_enabled", "/proc/self/status"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[-1]


def test_children_spawned_inside_have_thp_off_and_the_daemon_keeps_its_own() -> None:
    assert _child_thp() == "1"
    with thp.disabled_for_children():
        assert _child_thp() == "0"
    assert _child_thp() == "1"
    assert thp._prctl(thp.PR_GET_THP_DISABLE, 0) == 0


def test_under_kvm_nothing_changes() -> None:
    with thp.disabled_for_children(enabled=False):
        assert _child_thp() == "1"
