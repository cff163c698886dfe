"""Disposables made on demand: qvm-run --dispvm, and nothing left behind."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.vm


def disp_names(bulkhead) -> list[str]:
    return [n for n in bulkhead.tool("qvm-ls", "--raw-list").stdout.split() if n.startswith("disp")]


def leftovers(bulkhead, name: str) -> list[str]:
    return [str(p) for p in (bulkhead.home / "pools").rglob("*") if f"/{name}/" in f"{p}/"]


def test_qvm_run_dispvm_prints_and_leaves_nothing(bulkhead):
    before = set(disp_names(bulkhead))
    r = bulkhead.tool("qvm-run", "--dispvm", "--pass-io",
                      "echo hi; hostname >&2; echo data > /home/user/mine")
    assert r.stdout == "hi\n", r
    name = r.stderr.strip().splitlines()[-1]
    assert name.startswith("disp")
    deadline = time.monotonic() + 60
    while set(disp_names(bulkhead)) - before:
        assert time.monotonic() < deadline, disp_names(bulkhead)
        time.sleep(0.5)
    assert leftovers(bulkhead, name) == []
    # The next disposable of the same template starts clean.
    r = bulkhead.tool("qvm-run", "--dispvm", "--pass-io", "cat /home/user/mine 2>&1; true")
    assert "No such file" in r.stdout


def test_a_disposable_left_by_a_killed_daemon_is_gone_after_its_restart(bulkhead):
    name = bulkhead.app().call("dom0", "admin.vm.CreateDisposable").decode().strip()
    bulkhead.tool("qvm-start", name)
    bulkhead.kill_daemon()
    bulkhead.start_daemon()
    assert name not in disp_names(bulkhead)
    assert leftovers(bulkhead, name) == []
    assert bulkhead.run("work", "echo alive").stdout == "alive\n"


def test_preloaded_disposables_are_ready_handed_out_once_and_refilled(bulkhead):
    bulkhead.tool("qvm-features", "default-dvm", "preload-dispvm-max", "1")
    try:
        deadline = time.monotonic() + 120
        while True:
            names = bulkhead.tool("qvm-features", "default-dvm", "preload-dispvm",
                                  check=False).stdout.split()
            if names and bulkhead.state(names[0]) == "Paused" and bulkhead.tool(
                    "qvm-features", names[0], "preload-dispvm-completed", check=False).stdout:
                break
            assert time.monotonic() < deadline, "no preload became ready"
            time.sleep(0.5)
        preload = names[0]
        r = bulkhead.tool("qvm-run", "--dispvm", "--pass-io", "hostname")
        assert r.stdout.strip() == preload          # the request took the ready one...
        deadline = time.monotonic() + 120
        while True:                                  # ...and a refill made a new one
            names = bulkhead.tool("qvm-features", "default-dvm", "preload-dispvm",
                                  check=False).stdout.split()
            if names and names[0] != preload:
                break
            assert time.monotonic() < deadline, "no refill"
            time.sleep(0.5)
        assert preload not in disp_names(bulkhead) or bulkhead.state(preload) != "Running"
    finally:
        bulkhead.tool("qvm-features", "--unset", "default-dvm", "preload-dispvm-max")
    deadline = time.monotonic() + 60
    while disp_names(bulkhead):
        assert time.monotonic() < deadline, f"preloads left: {disp_names(bulkhead)}"
        time.sleep(0.5)


def test_a_named_disposable_keeps_its_definition_and_loses_its_data(bulkhead):
    bulkhead.tool("qvm-create", "-C", "DispVM", "-t", "default-dvm", "-l", "red",
                  "--prop", "netvm=", "mydisp")
    try:
        bulkhead.run("mydisp", "echo secret > /home/user/note")
        bulkhead.tool("qvm-shutdown", "--wait", "mydisp", timeout=120)
        assert "mydisp" in bulkhead.tool("qvm-ls", "--raw-list").stdout.split()
        r = bulkhead.run("mydisp", "cat /home/user/note 2>&1; true")
        assert "No such file" in r.stdout
    finally:
        bulkhead.tool("qvm-kill", "mydisp", check=False)
        bulkhead.tool("qvm-remove", "-f", "mydisp", check=False)


def test_a_disposable_whose_qemu_dies_leaves_no_trace(bulkhead):
    import os
    import signal

    name = bulkhead.app().call("dom0", "admin.vm.CreateDisposable").decode().strip()
    bulkhead.tool("qvm-start", name)
    os.kill(bulkhead.qemu_pid(name), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while name in disp_names(bulkhead):
        assert time.monotonic() < deadline, f"{name} still listed after its QEMU died"
        time.sleep(0.3)
    assert leftovers(bulkhead, name) == []
    assert bulkhead.run("work", "echo alive").stdout == "alive\n"


def test_two_disposables_have_their_own_names_and_random_bytes(bulkhead):
    outs = [bulkhead.tool("qvm-run", "--dispvm", "--pass-io",
                          "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
                          "echo; grep -c saved=1 /proc/cmdline").stdout.split()
            for _ in range(2)]
    assert outs[0][0] != outs[1][0] and all(o[0].startswith("disp") for o in outs)
    assert outs[0][1] != outs[1][1]
