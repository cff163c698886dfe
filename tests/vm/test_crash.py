"""A QEMU that dies is reported honestly, and the qube's data survives."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.vm


def test_sigkill_of_qemu_is_noticed_and_private_survives(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.run(q, "echo before-crash > /home/user/crash-marker; sync")
    pid = bulkhead.qemu_pid(q)
    os.kill(pid, signal.SIGKILL)
    # The bound: qvm-ls shows it not Running within 2 s.
    time.sleep(2.0)
    line = [l for l in bulkhead.tool("qvm-ls", q).stdout.splitlines() if l.startswith(q + " ")]
    assert line and line[0].split()[1] != "Running", line
    assert line[0].split()[1] == "Crashed"
    # Its private volume is intact: the next start sees what was written and synced.
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "cat /home/user/crash-marker").stdout == "before-crash\n"
    assert bulkhead.state(q) == "Running"


def test_kill_is_immediate_and_start_works_again(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.tool("qvm-kill", q)
    assert bulkhead.state(q) == "Halted"
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "echo alive").stdout == "alive\n"


def test_pause_and_unpause(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.tool("qvm-pause", q)
    assert bulkhead.state(q) == "Paused"
    bulkhead.tool("qvm-unpause", q)
    assert bulkhead.state(q) == "Running"
    assert bulkhead.run(q, "echo after-pause").stdout == "after-pause\n"


def test_failed_start_is_undone_and_explained(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-shutdown", "--wait", q, check=False)
    # A kernel that finds no init panics and the machine resets during start-up.
    bulkhead.tool("qvm-prefs", q, "kernelopts", "init=/nonexistent")
    try:
        r = bulkhead.tool("qvm-start", q, check=False)
        assert r.returncode != 0
        assert "console log" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert bulkhead.state(q) in ("Halted", "Crashed")
        volumes = bulkhead.home / "pools" / "default" / "appvms" / q
        assert not list(volumes.rglob("dirty.qcow2")), "a failed start left a volume started"
    finally:
        bulkhead.tool("qvm-prefs", "-D", q, "kernelopts")
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "echo fine").stdout == "fine\n"
