"""The management stack against real qubes: a qube's whole life, events, the daemon's restart."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
from hostile import raw_call

pytestmark = pytest.mark.vm


def qvm_ls_row(bulkhead, name: str) -> list[str] | None:
    for line in bulkhead.tool("qvm-ls").stdout.splitlines():
        if line.split()[:1] == [name]:
            return line.split()
    return None


def test_create_start_list_shutdown_remove(bulkhead):
    bulkhead.tool("qvm-create", "-t", "debian-12", "-l", "green", "t1")
    vol_dir = bulkhead.home / "pools" / "default" / "appvms" / "t1"
    assert list((vol_dir / "private").glob("img-*.qcow2"))   # its first revision
    bulkhead.tool("qvm-start", "t1")
    assert qvm_ls_row(bulkhead, "t1")[:5] == ["t1", "Running", "AppVM", "green", "debian-12"]
    bulkhead.tool("qvm-shutdown", "--wait", "t1")
    assert qvm_ls_row(bulkhead, "t1")[1] == "Halted"
    bulkhead.tool("qvm-remove", "-f", "t1")
    assert qvm_ls_row(bulkhead, "t1") is None
    assert not vol_dir.exists(), "the removed qube's volumes are still on disk"


def test_wire_format_against_the_real_daemon(bulkhead):
    listing = raw_call(bulkhead.socket, b"admin.vm.List+ dom0 name dom0\0")
    assert listing.startswith(b"0\0")
    lines = listing[2:].decode().splitlines()
    assert "dom0 class=AdminVM state=Running" in lines
    assert any(l.startswith("work class=AppVM state=") for l in lines)
    assert raw_call(bulkhead.socket, b"admin.vm.property.Get+netvm dom0 name work\0") == \
        b"0\0default=True type=vm sys-firewall"
    err = raw_call(bulkhead.socket, b"admin.vm.property.Get+netvm dom0 name nope\0")
    assert err.startswith(b"2\0QubesVMNotFoundError\0")


def test_events_stream_sees_a_start_by_another_client(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-shutdown", "--wait", q, check=False)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(bulkhead.socket))
    s.sendall(b"admin.Events+ dom0 name dom0\0")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(120)
    received = bytearray()
    received += s.recv(65536)
    assert received.startswith(b"1\0")           # connection-established comes first
    starter = threading.Thread(target=bulkhead.tool, args=("qvm-start", q))
    starter.start()
    wanted = b"1\0" + q.encode() + b"\0domain-start\0"
    while wanted not in received:
        chunk = s.recv(65536)
        assert chunk, "the event stream closed"
        received += chunk
    starter.join()
    s.close()


def test_daemon_killed_comes_back_and_readopts_running_qubes(bulkhead, work):
    import subprocess
    bulkhead.run(work, "echo before > /tmp/adopt-marker")
    # Calls still running when the daemon dies: their channel numbers must not
    # trouble the next daemon, which numbers its own from 1 again.
    long_calls = [subprocess.Popen([str(bulkhead.env["PATH"].split(":")[0] + "/qvm-run"), "-p",
                                    work, f"echo started; sleep {20 + i}"],
                                   env=bulkhead.env, stdout=subprocess.PIPE)
                  for i in range(3)]
    for p in long_calls:
        assert p.stdout.readline() == b"started\n"
    qemu = bulkhead.qemu_pid(work)
    bulkhead.kill_daemon(signal.SIGKILL)
    for p in long_calls:
        p.kill()
        p.wait()
    bulkhead.start_daemon()
    assert bulkhead.qemu_pid(work) == qemu
    assert bulkhead.state(work) == "Running"
    # Same machine, same memory: the marker in its tmpfs is still there.
    for _ in range(4):
        assert bulkhead.run(work, "cat /tmp/adopt-marker").stdout == "before\n"


def test_daemon_network_namespace_has_only_lo(bulkhead, work):
    pid = bulkhead.daemon_pid()
    ifaces = [line.split(":")[0].strip() for line in
              open(f"/proc/{pid}/net/dev").read().splitlines()[2:]]
    assert ifaces == ["lo"]
    qemu = bulkhead.qemu_pid(work)
    assert os.readlink(f"/proc/{qemu}/ns/net") == os.readlink(f"/proc/{pid}/ns/net")
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")


def test_volumes_as_qubes_lays_them_out(bulkhead):
    listing = bulkhead.tool("qvm-volume", "list", "work").stdout
    for volume in ("root", "private", "volatile", "kernel"):
        assert f"work:{volume}" in listing or f" {volume} " in listing, listing
    kernel = bulkhead.app().default_kernel
    info = dict(line.split(None, 1) for line in
                bulkhead.tool("qvm-volume", "info", "work:kernel").stdout.splitlines()
                if len(line.split(None, 1)) == 2)
    assert info["pool"].strip() == "linux-kernel"
    assert info["vid"].strip() == kernel
    assert info["rw"].strip() == "False"
    assert int(info["size"].strip()) > 1_000_000  # dom0's vmlinux
    root = bulkhead.tool("qvm-volume", "info", "work:root").stdout
    assert "snap_on_start" in root and "vm-templates/debian-12/root" in root


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_real_daemon_survives_malformed_requests_with_bounded_memory(bulkhead):
    import random

    from hostile import KNOWN_ERRORS, malformed

    pid = bulkhead.daemon_pid()
    rng = random.Random(1234)
    # Warm up (imports, caches), then measure across 1,000 malformed requests.
    for i in range(100):
        raw_call(bulkhead.socket, malformed(rng, i))
    before = _rss_kib(pid)
    for i in range(1000):
        reply = raw_call(bulkhead.socket, malformed(rng, i))
        if reply:
            assert reply.startswith(b"2\0"), reply[:80]
            assert reply.split(b"\0")[1].decode() in KNOWN_ERRORS, reply[:120]
    after = _rss_kib(pid)
    # Some requests carry payloads of ~90 KB: nothing of them may stay behind.
    assert after - before < 16 * 1024, (before, after)
    assert raw_call(bulkhead.socket, b"admin.vm.List+ dom0 name dom0\0").startswith(b"0\0")
