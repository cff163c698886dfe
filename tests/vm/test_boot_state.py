"""Qubes started from a saved boot state (bulkhead/bootstate.py), on real machines."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

GETRANDOM = ("python3 -c 'import os; print(os.getrandom(16).hex())'; "
             "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")


def boot_state(bulkhead, qube: str, build: bool = False) -> str:
    args = ["bulkhead", "boot-state", qube] + (["--build"] if build else [])
    return bulkhead.tool(*args, timeout=300).stdout.strip()


def restored(bulkhead, qube: str) -> bool:
    return "bulkhead.saved=1" in bulkhead.run(qube, "cat /proc/cmdline").stdout


def fresh_start(bulkhead, qube: str) -> None:
    if bulkhead.state(qube) != "Halted":
        bulkhead.tool("qvm-shutdown", "--wait", qube, timeout=120)
    bulkhead.tool("qvm-start", qube, timeout=180)


@pytest.fixture(scope="module")
def twins(bulkhead):
    names = ["bs-one", "bs-two"]
    for n in names:
        if bulkhead.tool("qvm-check", n, check=False).returncode != 0:
            bulkhead.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=", n)
    yield names
    for n in names:
        bulkhead.tool("qvm-kill", n, check=False)
        bulkhead.tool("qvm-remove", "-f", n, check=False)


def test_two_qubes_restored_from_one_state_are_distinct(bulkhead, twins):
    state = boot_state(bulkhead, twins[0], build=True)
    assert state.startswith("ready "), state
    # Both qubes have one shape and one template: one state.
    assert boot_state(bulkhead, twins[1]) == state
    seen = {}
    for n in twins:
        fresh_start(bulkhead, n)
        assert restored(bulkhead, n)
        out = bulkhead.run(n, "hostname; " + GETRANDOM).stdout.split()
        assert out[0] == n
        seen[n] = out[1:]
    a, b = seen[twins[0]], seen[twins[1]]
    assert a[0] != b[0], "getrandom() gave the same bytes in two restored qubes"
    assert a[1] != b[1], "/dev/urandom gave the same bytes in two restored qubes"


def test_restored_qube_keeps_its_private_data_and_size(bulkhead, twins):
    n = twins[0]
    bulkhead.run(n, "echo kept > /home/user/kept")
    bulkhead.tool("qvm-shutdown", "--wait", n, timeout=120)
    # A private volume of another size than the placeholder, and than before.
    bulkhead.tool("qvm-volume", "resize", f"{n}:private", str(3 * 2**30))
    bulkhead.tool("qvm-start", n, timeout=180)
    assert restored(bulkhead, n)
    out = bulkhead.run(n, "cat /home/user/kept; cat /sys/block/vdb/size; "
                          "df -k /rw | tail -1").stdout.split("\n")
    assert out[0] == "kept"
    assert int(out[1]) == 3 * 2**30 // 512
    assert int(out[2].split()[1]) > 2.5 * 2**20     # the filesystem grew to the disk (KiB)
    bulkhead.tool("qvm-shutdown", "--wait", n, timeout=120)
    # The filesystem the restored qube wrote is clean.
    vol_dir = bulkhead.home / "pools" / "default" / "appvms" / n / "private"
    images = sorted(vol_dir.glob("img-*.qcow2"), key=lambda p: int(p.name.split("-")[1]))
    raw = bulkhead.home / "fsck.raw"
    # -U: a merge of the chain may run in the background (it never changes what it shows).
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(images[-1]), str(raw)],
                   check=True)
    try:
        r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        raw.unlink()


def test_a_damaged_state_is_rebuilt_not_restored(bulkhead, twins):
    n = twins[1]
    state = boot_state(bulkhead, n, build=True)
    key = state.split()[1]
    # Built on the build cache's template image: kept in the cache, for every instance.
    path = Path(bulkhead.env["BULKHEAD_CACHE"]) / "boot-states" / key / "state"
    if not path.exists():
        path = bulkhead.home / "boot-states" / key / "state"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh_start(bulkhead, n)
    assert not restored(bulkhead, n), "a damaged state was restored"
    assert "damaged" in bulkhead.daemon_log()
    assert boot_state(bulkhead, n, build=True) == f"ready {key}"
    fresh_start(bulkhead, n)
    assert restored(bulkhead, n)


def test_feature_boot_state_0_boots_cold(bulkhead, twins):
    n = twins[1]
    bulkhead.tool("qvm-features", n, "boot-state", "0")
    try:
        assert boot_state(bulkhead, n) == "off"
        fresh_start(bulkhead, n)
        assert not restored(bulkhead, n)
        assert bulkhead.run(n, "hostname").stdout.strip() == n
    finally:
        bulkhead.tool("qvm-features", "--unset", n, "boot-state")
    bulkhead.tool("qvm-shutdown", "--wait", n, timeout=120)


def test_a_template_that_changes_its_root_never_gets_a_stale_state_restored(bulkhead, twins):
    n = twins[0]
    before = boot_state(bulkhead, n, build=True).split()[1]
    if bulkhead.state("debian-12") != "Halted":
        bulkhead.tool("qvm-shutdown", "--wait", "debian-12", timeout=120)
    bulkhead.tool("qvm-start", "debian-12", timeout=180)
    bulkhead.run("debian-12", "echo changed > /etc/bulkhead-root-changed", user="root")
    # While the template runs, its committed root (what AppVMs get) is unchanged.
    fresh_start(bulkhead, n)
    assert bulkhead.run(n, "cat /etc/bulkhead-root-changed 2>/dev/null; true").stdout == ""
    bulkhead.tool("qvm-shutdown", "--wait", n, timeout=120)
    bulkhead.tool("qvm-shutdown", "--wait", "debian-12", timeout=120)
    # Now the template's root has a new revision: the old state no longer applies.
    after = boot_state(bulkhead, n)
    assert after.split()[-1] != before, after
    bulkhead.tool("qvm-start", n, timeout=180)
    assert bulkhead.run(n, "cat /etc/bulkhead-root-changed").stdout == "changed\n"
    bulkhead.tool("qvm-shutdown", "--wait", n, timeout=120)
    # Leave the template as it was for the other tests' sake.
    bulkhead.tool("qvm-start", "debian-12", timeout=180)
    bulkhead.run("debian-12", "rm -f /etc/bulkhead-root-changed", user="root")
    bulkhead.tool("qvm-shutdown", "--wait", "debian-12", timeout=120)


def test_disposables_take_boot_state_from_their_disposable_template(bulkhead):
    dispvm = ["qvm-run", "--dispvm", "--pass-io", "grep -c bulkhead.saved=1 /proc/cmdline; true"]
    assert boot_state(bulkhead, "default-dvm", build=True).startswith("ready ")
    assert bulkhead.tool(*dispvm).stdout.strip() == "1"
    bulkhead.tool("qvm-features", "default-dvm", "boot-state", "0")
    try:
        assert bulkhead.tool(*dispvm).stdout.strip() == "0"
    finally:
        bulkhead.tool("qvm-features", "--unset", "default-dvm", "boot-state")
