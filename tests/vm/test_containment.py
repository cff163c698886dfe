"""Each qube's QEMU jailed, bounded and accounted for (real qubes).

- the jail: a uid of its own, no capabilities, no new privileges, a mount
  namespace holding none of another qube's volumes, sockets or run directory;
- the cgroup: memory and pids limits as documented; over its memory limit a
  QEMU is killed by the kernel, its qube shows Crashed and nothing else moves;
- free page reporting: memory the guest frees goes back to the host;
- a guest kernel panic shows as Crashed, a clean shutdown as Halted;
- ``autostart=True`` qubes run once a freshly started daemon answers.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bulkhead.backend import cgroup

pytestmark = pytest.mark.vm

CLONE_NEWNS = 0x00020000
MIB = 1024 * 1024


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text()
                .splitlines() if ":\t" in line)


def drive_files(pid: int) -> list[str]:
    """The image files a QEMU was given (``-drive file=...``)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return [a.split("file=", 1)[1].split(",")[0] for a in argv if a.startswith("file=")]


def in_mount_namespace_of(pid: int, paths: list[str]) -> dict[str, bool]:
    """Which of ``paths`` exist as seen from inside ``pid``'s mount namespace (as
    ``nsenter -t PID -m`` would see them: the jail has no shell to run there)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNS) == 0:
                os.chdir("/")
                os.write(w, json.dumps({p: os.path.exists(p) for p in paths}).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, raw = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(raw) == 0, "could not enter the mount namespace"
    return json.loads(data)


def open_as(uid: int, path: str) -> str:
    """Try to open ``path`` for reading as ``uid`` (and gid) on the host; 'ok' or the error."""
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        "--", "dd", f"if={path}", "of=/dev/null", "bs=512", "count=1"],
                       capture_output=True, text=True)
    return "ok" if r.returncode == 0 else r.stderr.strip()


def qemu_cgroup(pid: int) -> cgroup.QubeCgroup:
    """The cgroup the kernel has the QEMU in (read from /proc, not from the daemon)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    root = cgroup.CGROUP_ROOT
    if (root / "cgroup.controllers").exists():
        [path] = [l.split(":", 2)[2] for l in lines if l.startswith("0::")]
        return cgroup.QubeCgroup({"": root / path.lstrip("/")}, v2=True)
    dirs = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            if c in ("memory", "pids", "cpu"):
                dirs[c] = root / c / path.lstrip("/")
    return cgroup.QubeCgroup(dirs, v2=False)


def rss_mib(pid: int) -> float:
    return int(status(pid)["VmRSS"].split()[0]) / 1024


def wait_state(inst, qube: str, wanted: str, limit: float = 60) -> str:
    deadline = time.monotonic() + limit
    state = inst.state(qube)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        state = inst.state(qube)
    return state


@pytest.fixture
def two_running(bulkhead, work, scratch_qube):
    bulkhead.ensure_running(scratch_qube)
    return work, scratch_qube


def test_each_qemu_runs_jailed_under_its_own_uid(bulkhead, two_running):
    a, b = two_running
    pids = {q: bulkhead.qemu_pid(q) for q in (a, b, "sys-net", "sys-firewall")}
    uids = {}
    for q, pid in pids.items():
        st = status(pid)
        real, eff, saved, fs = st["Uid"].split()
        assert real == eff == saved == fs != "0", (q, st["Uid"])
        assert st["Gid"].split()[0] != "0"
        assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0000000000000000", q
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", q   # QEMU's filter is on
        # Under TCG no transparent huge pages (bulkhead.backend.thp); under KVM they stay.
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        tcg = argv[argv.index(b"-accel") + 1].startswith(b"tcg")
        assert st["THP_enabled"] == ("0" if tcg else "1"), q
        # PID 1 of a namespace of its own; dom0's (empty) network namespace.
        assert st["NSpid"].split()[-1] == "1"
        assert os.readlink(f"/proc/{pid}/ns/net") == \
            os.readlink(f"/proc/{bulkhead.daemon_pid()}/ns/net")
        uids[q] = int(real)
    assert len(set(uids.values())) == len(uids), uids

    files_a, files_b = drive_files(pids[a]), drive_files(pids[b])
    run_a, run_b = bulkhead.paths.qube_run_dir(a), bulkhead.paths.qube_run_dir(b)
    others = [*files_b, str(run_b), str(run_b / "qmp.sock"), str(run_b / "qrexec.sock"),
              str(bulkhead.paths.qube_run_dir("sys-net") / "console.sock"),
              str(run_a / "qmp.sock"), str(bulkhead.paths.store), "/etc/shadow", "/root",
              "/sys/fs/cgroup", "/usr/bin/python3", "/bin/sh"]
    seen = in_mount_namespace_of(pids[a], files_a + others)
    assert all(seen[f] for f in files_a), seen          # its own images are there
    assert not any(seen[p] for p in others), {p: v for p, v in seen.items() if v and p in others}

    # Its images are its uid's alone: another qube's uid cannot open them.  So is its
    # qrexec data disk (bulkhead.datadisk), which it writes too (its calls' input).
    assert any("/data-disks/" in f for f in files_a), files_a
    for f in files_a:
        st = os.stat(f)
        assert (st.st_uid, st.st_mode & 0o777) == (uids[a], 0o600), f
        assert "Permission denied" in open_as(uids[b], f), f
    # dom0's sockets for the qube are root's, in a directory only root can enter.
    for name in ("qmp", "qrexec", "console"):
        st = os.stat(run_a / f"{name}.sock")
        assert st.st_uid == 0 and st.st_mode & 0o077 == 0
    assert os.stat(bulkhead.paths.run).st_mode & 0o077 == 0


def test_cgroup_limits_as_documented(bulkhead, two_running):
    for q in two_running:
        pid = bulkhead.qemu_pid(q)
        cg = qemu_cgroup(pid)
        memory = int(bulkhead.tool("qvm-prefs", q, "memory").stdout)
        assert cg.memory_limit() == (memory + cgroup.QEMU_OVERHEAD_MIB) * MIB
        assert cg.pids_limit() == cgroup.PIDS_MAX
        assert str(cg.memory_dir).endswith(f"/bulkhead-{bulkhead.paths.run.name}/{q}")


def test_freed_guest_memory_goes_back_to_the_host(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.ensure_running(q)
    pid = bulkhead.qemu_pid(q)
    # Let what the boot freed be reported first.
    time.sleep(3)
    before = rss_mib(pid)
    hold = subprocess.Popen(
        [str(Path(bulkhead.env["PATH"].split(":")[0]) / "qvm-run"), "-p", q,
         "python3 -c \"import sys, time; b = b'x' * (200 << 20); print('held', flush=True); "
         "sys.stdin.read()\""],
        env=bulkhead.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hold.stdout.readline() == "held\n"
    peak = rss_mib(pid)
    hold.stdin.close()          # the guest's process exits: 200 MiB freed in the guest
    assert hold.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    after = rss_mib(pid)
    while after > peak - 150 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = rss_mib(pid)
    assert peak - before >= 150, (before, peak)
    assert peak - after >= 150, f"RSS before {before:.0f}, peak {peak:.0f}, after {after:.0f} MiB"
    # qvm-ls's MEM: what the QEMU holds now (its PSS), never more than RSS.
    line = bulkhead.tool("qvm-ls", "--raw-data", "-O", "name,memory,maxmem,mem", q).stdout.strip()
    name, _memory, _maxmem, mem = line.split("|")
    assert name == q and 0 < int(mem) <= rss_mib(pid) + 1


def test_guest_kernel_panic_is_crashed_and_poweroff_is_halted(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.ensure_running(q)
    bulkhead.run(q, "echo c > /proc/sysrq-trigger", user="root", check=False)
    assert wait_state(bulkhead, q, "Crashed") == "Crashed"
    assert "guest kernel panicked" in bulkhead.daemon_log()
    bulkhead.tool("qvm-start", q)
    bulkhead.tool("qvm-shutdown", "--wait", q)
    assert bulkhead.state(q) == "Halted"


def test_qemu_over_its_memory_limit_is_killed_and_only_it(bulkhead, work, scratch_qube):
    q = scratch_qube
    bulkhead.ensure_running(q)
    pid = bulkhead.qemu_pid(q)
    others = {o: bulkhead.qemu_pid(o) for o in (work, "sys-net", "sys-firewall")}
    cg = qemu_cgroup(pid)
    # Bring the limit down to what the QEMU holds now plus a little, then have the
    # guest touch 200 MiB more: the kernel's OOM killer must take this QEMU.
    usage = int((cg.memory_dir / ("memory.current" if cg.v2 else "memory.usage_in_bytes"))
                .read_text())
    limit_file = cg.memory_dir / ("memory.max" if cg.v2 else "memory.limit_in_bytes")
    limit_file.write_text(str(usage + 48 * MIB))
    bulkhead.run(q, "python3 -c \"b = b'x' * (200 << 20)\"", check=False)
    assert wait_state(bulkhead, q, "Crashed") == "Crashed"
    assert not Path(f"/proc/{pid}").exists()
    assert "over its memory limit" in bulkhead.daemon_log()
    # The daemon and every other qube carry on.
    for o, opid in others.items():
        assert bulkhead.qemu_pid(o) == opid and bulkhead.state(o) == "Running"
    assert bulkhead.run(work, "echo still here").stdout == "still here\n"
    # And the qube starts again, under its documented limit.
    bulkhead.tool("qvm-start", q)
    memory = int(bulkhead.tool("qvm-prefs", q, "memory").stdout)
    assert qemu_cgroup(bulkhead.qemu_pid(q)).memory_limit() == \
        (memory + cgroup.QEMU_OVERHEAD_MIB) * MIB


def test_autostart_qube_runs_once_a_fresh_daemon_answers(bulkhead, scratch_qube):
    q = scratch_qube
    bulkhead.tool("qvm-shutdown", "--wait", q, check=False)
    bulkhead.tool("qvm-prefs", q, "autostart", "True")
    try:
        bulkhead.kill_daemon(signal.SIGTERM)
        bulkhead.start_daemon()
        assert bulkhead.state(q) == "Running"
        assert bulkhead.run(q, "echo up").stdout == "up\n"
    finally:
        bulkhead.tool("qvm-prefs", q, "autostart", "False")


def test_guest_gone_while_no_daemon_watched_is_settled_at_adoption(bulkhead, scratch_qube):
    # QEMU stops (not exits) when its guest goes, for dom0 to read why: a daemon
    # that was down then finds it stopped, lets it exit, and the qube is Halted.
    import socket

    q = scratch_qube
    bulkhead.ensure_running(q)
    pid = bulkhead.qemu_pid(q)
    bulkhead.kill_daemon(signal.SIGKILL)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(bulkhead.paths.qube_run_dir(q) / "qmp.sock"))
        f = s.makefile("rw")
        f.readline()
        f.write('{"execute": "qmp_capabilities"}\n{"execute": "system_reset"}\n'
                '{"execute": "query-status"}\n')
        f.flush()
        status = None
        while status is None:
            reply = json.loads(f.readline())
            status = (reply.get("return") or {}).get("status")
        f.close()
        s.close()
        assert status == "shutdown"
        assert Path(f"/proc/{pid}").exists()      # stopped, waiting for dom0
    finally:
        bulkhead.start_daemon()
    assert bulkhead.state(q) == "Halted"
    assert not Path(f"/proc/{pid}").exists()
    bulkhead.tool("qvm-start", q)
    assert bulkhead.run(q, "echo again").stdout == "again\n"
