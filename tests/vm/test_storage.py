"""Qubes' storage semantics on the qube `work`: what survives a restart, templates, revisions."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def restart(bulkhead, qube: str) -> None:
    bulkhead.tool("qvm-shutdown", "--wait", qube)
    assert bulkhead.state(qube) == "Halted"
    bulkhead.tool("qvm-start", qube)


def test_root_changes_vanish_and_home_persists(bulkhead, work):
    q = work
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.run(q, "echo etc > /etc/bulkhead-test; echo home > /home/user/kept; sync", user="root")
    assert bulkhead.run(q, "cat /etc/bulkhead-test /home/user/kept").stdout == "etc\nhome\n"
    restart(bulkhead, q)
    r = bulkhead.run(q, "cat /etc/bulkhead-test", check=False)
    assert r.returncode != 0, "a file written to /etc survived the restart of an AppVM"
    assert bulkhead.run(q, "cat /home/user/kept").stdout == "home\n"
    # /home is the private volume, mounted at /rw as in Qubes; /usr/local too.
    mounts = bulkhead.run(q, "cat /proc/mounts").stdout
    assert " /rw ext4 " in mounts and " /home ext4 " in mounts and " /usr/local ext4 " in mounts


def test_revert_private_brings_back_previous_revision(bulkhead, work):
    q = work
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.run(q, "echo first > /home/user/version; sync")
    restart(bulkhead, q)              # commits "first"
    bulkhead.run(q, "echo second > /home/user/version; sync")
    bulkhead.tool("qvm-shutdown", "--wait", q)   # commits "second"; "first" is a kept revision
    revisions = bulkhead.tool("qvm-volume", "info", f"{q}:private", "revisions").stdout.split()
    assert revisions, "no kept revision of private"
    bulkhead.tool("qvm-volume", "revert", f"{q}:private")
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "cat /home/user/version").stdout == "first\n"


def _make_deb(tmp_path: Path) -> Path:
    """A tiny real Debian package, built on the host with dpkg-deb."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: bulkhead-test-pkg\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Bulkhead tests <tests@bulkhead.invalid>\nDescription: test package\n")
    (root / "usr" / "share" / "bulkhead-test").mkdir(parents=True)
    (root / "usr" / "share" / "bulkhead-test" / "marker").write_text("installed in the template\n")
    deb = tmp_path / "bulkhead-test-pkg.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def test_package_installed_in_template_reaches_appvm(bulkhead, work, tmp_path):
    q = work
    deb = _make_deb(tmp_path)
    bulkhead.tool("qvm-start", "--skip-if-running", "debian-12")
    r = bulkhead.tool("qvm-run", "-p", "-u", "root", "debian-12",
                      "cat > /tmp/p.deb && dpkg -i /tmp/p.deb", input=deb.read_bytes(), text=False)
    assert b"bulkhead-test-pkg" in r.stdout + r.stderr
    bulkhead.tool("qvm-shutdown", "--wait", "debian-12")     # commits the template's root
    # A running AppVM keeps the root it started with; its next start sees the new one.
    if bulkhead.state(q) != "Halted":
        bulkhead.tool("qvm-shutdown", "--wait", q)
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "dpkg -s bulkhead-test-pkg | grep Status").stdout == \
        "Status: install ok installed\n"
    assert bulkhead.run(q, "cat /usr/share/bulkhead-test/marker").stdout == \
        "installed in the template\n"


def _df_bytes(bulkhead, qube: str) -> int:
    return int(bulkhead.run(qube, "df -B1 --output=size /rw | tail -1").stdout)


def test_private_grows_live_while_the_qube_runs(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.ensure_running(q)
    bulkhead.run(q, "head -c 3000000 /dev/urandom > /home/user/keep; "
                    "sha256sum /home/user/keep > /home/user/keep.sum; sync")
    size = int(bulkhead.tool("qvm-volume", "info", f"{q}:private", "size").stdout)
    before = _df_bytes(bulkhead, q)
    bulkhead.tool("qvm-volume", "resize", f"{q}:private", str(2 * size))
    # The qube saw its disk grow and grew its filesystem: df says so at once.
    assert bulkhead.state(q) == "Running"
    after = _df_bytes(bulkhead, q)
    assert after > before + size // 2, (before, after)
    assert int(bulkhead.tool("qvm-volume", "info", f"{q}:private", "size").stdout) == 2 * size
    assert bulkhead.run(q, "sha256sum -c /home/user/keep.sum").returncode == 0
    # Shrinking is refused, with one clear line.
    r = bulkhead.tool("qvm-volume", "resize", f"{q}:private", str(size), check=False)
    assert r.returncode != 0 and "shrinking" in r.stderr and f"{q}:private" in r.stderr
    # The new size holds across a restart (the grown copy was committed).
    bulkhead.tool("qvm-shutdown", "--wait", q)
    bulkhead.tool("qvm-start", q)
    assert _df_bytes(bulkhead, q) == after
    assert bulkhead.run(q, "sha256sum -c /home/user/keep.sum").returncode == 0


def test_volume_usage_counts_the_kept_revisions(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.ensure_running(q)
    bulkhead.run(q, "head -c 20000000 /dev/urandom > /home/user/usage; sync")
    bulkhead.tool("qvm-shutdown", "--wait", q)
    # A background merge of old revisions may be changing the files: compare once they
    # hold still (two reads that agree).
    deadline = time.monotonic() + 60
    while True:
        usage = int(bulkhead.tool("qvm-volume", "info", f"{q}:private", "usage").stdout)
        path = Path(bulkhead.tool("qvm-volume", "info", f"{q}:private", "path").stdout.strip())
        on_disk = sum(p.stat().st_blocks * 512 for p in path.parent.iterdir() if p.is_file())
        if usage == on_disk or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert usage == on_disk and usage > 20_000_000
    listing = bulkhead.tool("qvm-ls", "--format", "disk", q).stdout
    assert str(usage // 2**20) in listing.split("\n", 1)[1]
