"""A full disk loses nothing and locks nobody out: a Bulkhead instance of its own whose
``$BULKHEAD_HOME`` is a small ext4 loop filesystem, filled up on purpose.

The instance holds only the template and the qube ``vault`` (no network): the
fill-up is done by a filler file on the host, so each test decides exactly how
much room is left.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CACHE, Instance, _have_built_artifacts, make_instance, teardown_instance
from loopfs import loop_filesystem

pytestmark = pytest.mark.vm

FS_MIB = 1280
QUBE = "vault"
PATTERN = b"0123456789abcdef\n"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def small() -> Instance:
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (QEMU, loop devices)")
    if not _have_built_artifacts():
        pytest.fail(f"no kernel or template image in {CACHE}: run scripts/test.sh")
    with loop_filesystem("ext4", FS_MIB, "small-fs") as mnt:
        inst = make_instance(mnt / "home", "--no-default-qubes")
        try:
            inst.tool("qvm-create", "-t", "debian-12", "-l", "black", "--prop", "netvm=", QUBE)
            inst.tool("qvm-start", QUBE)   # first start formats the private volume
            yield inst
        finally:
            teardown_instance(inst)


def free_bytes(inst: Instance) -> int:
    st = os.statvfs(inst.home)
    return st.f_bavail * st.f_frsize


class Filler:
    """A host file taking all but ``leave`` bytes of the instance's filesystem."""

    def __init__(self, inst: Instance) -> None:
        self.path = inst.home / "filler"
        self.inst = inst

    def fill(self, leave: int) -> None:
        self.free()
        size = free_bytes(self.inst) - leave - 16 * 2**20
        if size > 0:
            _sh("fallocate", "-l", str(size), str(self.path))
        # The last bytes by writing (fallocate wants room for its own metadata too).
        with open(self.path.with_name("filler-tail"), "wb") as f:
            try:
                while free_bytes(self.inst) > leave:
                    f.write(b"\0" * 65536)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                pass

    def free(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name("filler-tail").unlink(missing_ok=True)


@pytest.fixture
def filler(small: Instance) -> Filler:
    f = Filler(small)
    yield f
    f.free()


def temp_files(inst: Instance) -> list[str]:
    return [str(p) for p in (inst.home / "pools").rglob(".tmp-*")]


def ready(inst: Instance) -> None:
    """The qube running, whatever an earlier test left (a pause on a full disk)."""
    inst.ensure_running(QUBE)
    if inst.state(QUBE) == "Paused":
        inst.tool("qvm-unpause", QUBE)


def wait_for(what: str, check, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


class Events:
    """admin.Events of dom0, collected in a thread."""

    def __init__(self, inst: Instance) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(inst.socket))
        self.sock.sendall(b"admin.Events+ dom0 name dom0\0")
        self.sock.shutdown(socket.SHUT_WR)
        self.received = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except OSError:
            pass   # closed by the test

    def close(self) -> None:
        self.sock.close()


def expected_digest(size: int) -> str:
    data = (PATTERN * (size // len(PATTERN) + 1))[:size]
    return hashlib.sha256(data).hexdigest()


def test_a_qube_writing_into_a_full_pool_pauses_and_resumes_intact(small, filler, tmp_path):
    inst = small
    ready(inst)
    size = 160 * 2**20
    events = Events(inst)
    try:
        filler.fill(leave=40 * 2**20)
        # The qube writes more than is left; the write stalls when the host disk is full.
        inst.run(QUBE, f"nohup sh -c 'yes 0123456789abcdef | head -c {size} > /home/user/big; "
                       "sync; echo done > /home/user/big.done' >/dev/null 2>&1 &")
        wait_for("the qube to be paused", lambda: inst.state(QUBE) == "Paused")
        wait_for("the pause event", lambda: b"\0domain-paused\0" in events.received, 30)
        frame = events.received[events.received.index(b"\0domain-paused\0") - len(QUBE):]
        assert frame.startswith(QUBE.encode() + b"\0domain-paused\0")
        # The write that meets the full disk may be the private volume's or the root's
        # (the guest writes there too): either pauses the qube.
        assert b"reason\0no-space\0" in frame[:200]
        assert b"volume\0private\0" in frame[:200] or b"volume\0root\0" in frame[:200]
        log = inst.daemon_log()
        assert f"qube {QUBE} paused: no space left on volume private" in log or \
            f"qube {QUBE} paused: no space left on volume root" in log
        # The pool passed 90 %: a warning event, the log, qvm-pool info and bulkhead info.
        wait_for("the pool usage warning", lambda: b"\0pool-usage-warning\0" in events.received, 30)
        assert "is 9" in inst.daemon_log() or "is 100 %" in inst.daemon_log()
        pool_info = inst.tool("qvm-pool", "info", "default").stdout
        assert "size" in pool_info and "usage" in pool_info
        info = inst.tool("bulkhead", "info").stdout
        assert "pool:      default" in info and "WARNING" in info
    finally:
        events.close()
    # Space comes back; the user resumes the qube and the write completes.
    filler.free()
    inst.tool("qvm-unpause", QUBE)
    wait_for("the write to finish",
             lambda: inst.run(QUBE, "cat /home/user/big.done", check=False).stdout == "done\n")
    assert inst.state(QUBE) == "Running"
    out = inst.run(QUBE, "stat -c %s /home/user/big; sha256sum < /home/user/big").stdout.split()
    assert out[0] == str(size) and out[1] == expected_digest(size)
    inst.tool("qvm-shutdown", "--wait", QUBE)
    # The private volume's filesystem is clean (checked on a raw copy, off the small disk).
    current = inst.tool("qvm-volume", "info", f"{QUBE}:private", "path").stdout.strip()
    raw = tmp_path / "private.raw"
    _sh("qemu-img", "convert", "-U", "-O", "raw", current, str(raw))
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    raw.unlink()


def test_the_full_disk_story_replayed(small, filler):
    """The issue's story: shut down with almost no room left; nothing is stuck."""
    inst = small
    ready(inst)
    inst.run(QUBE, "head -c 100000000 /dev/urandom > /home/user/story; sha256sum "
                   "/home/user/story > /home/user/story.sum; sync")
    digest = inst.run(QUBE, "cat /home/user/story.sum").stdout
    filler.fill(leave=0)
    before = inst.tool("qvm-volume", "info", f"{QUBE}:private", "revisions").stdout.split()
    # Committing takes no room (the run's overlay becomes the revision): it succeeds.
    r = inst.tool("qvm-shutdown", "--wait", QUBE, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert temp_files(inst) == []
    after = inst.tool("qvm-volume", "info", f"{QUBE}:private", "revisions").stdout.split()
    assert after != before or not before
    # The next start, on a full disk, works (the pool gives up its reserve) and has every file.
    filler.fill(leave=0)
    inst.tool("qvm-start", QUBE)
    assert "gave up its 64 MiB reserve" in inst.daemon_log()
    assert inst.run(QUBE, "sha256sum /home/user/story").stdout == digest
    filler.free()
    inst.tool("qvm-shutdown", "--wait", QUBE)
    # Old revisions are merged in the background (the full disk had kept them back); a
    # temporary file exists only while a step writes it.
    wait_for("the pool to settle", lambda: temp_files(inst) == [], 120)
    assert inst.tool("qvm-volume", "info", f"{QUBE}:private", "revisions").stdout.split()


def test_a_commit_that_fails_is_reported_and_the_next_start_runs_on_the_changes(small):
    """A commit cannot complete (here: the volume's directory made immutable, as a
    stand-in for a host that refuses the rename): qvm-shutdown fails with one line
    naming the qube and the volume; nothing is lost and the qube starts again."""
    inst = small
    ready(inst)
    inst.run(QUBE, "echo uncommitted > /home/user/pending; sync")
    private_dir = Path(inst.tool("qvm-volume", "info", f"{QUBE}:private", "path")
                       .stdout.strip()).parent
    _sh("chattr", "+i", str(private_dir))
    try:
        r = inst.tool("qvm-shutdown", "--wait", QUBE, check=False)
    finally:
        _sh("chattr", "-i", str(private_dir))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and QUBE in lines[0] and "volume private" in lines[0], r.stderr
    assert inst.state(QUBE) == "Halted"
    assert (private_dir / "dirty.qcow2").exists() and temp_files(inst) == []
    inst.tool("qvm-start", QUBE)
    assert inst.run(QUBE, "cat /home/user/pending").stdout == "uncommitted\n"
    inst.tool("qvm-shutdown", "--wait", QUBE)
    assert not (private_dir / "dirty.qcow2").exists()
