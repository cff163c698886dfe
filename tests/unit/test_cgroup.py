"""bulkhead.backend.cgroup on fake cgroup trees (v1 and v2), then on this host's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bulkhead.backend import cgroup

MIB = 1024 * 1024


def v1_tree(root: Path) -> Path:
    for c in ("memory", "pids", "cpu"):
        (root / c / "sess").mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")
    return root


def test_limits_documented_budget():
    lim = cgroup.limits_for(400)
    assert lim.memory_bytes == (400 + cgroup.QEMU_OVERHEAD_MIB) * MIB
    assert lim.pids == cgroup.PIDS_MAX
    assert lim.cpu_weight == 100 and lim.cpu_shares == 1024


def test_v1_detect_under_the_daemons_own_cgroups(tmp_path):
    root = v1_tree(tmp_path)
    proc = "9:name=systemd:/\n8:pids:/\n4:memory:/sess\n1:cpu,cpuacct:/\n0::/\n"
    h = cgroup.detect(root, proc)
    assert isinstance(h, cgroup.V1Hierarchy)
    assert h.bases == {"memory": root / "memory" / "sess", "pids": root / "pids",
                       "cpu": root / "cpu"}


def test_v1_create_writes_every_limit(tmp_path):
    root = v1_tree(tmp_path)
    h = cgroup.detect(root, "8:pids:/\n4:memory:/sess\n1:cpu:/\n")
    assert h is not None
    # The kernel makes this file in each new cgroup where swap is accounted.
    mem = root / "memory" / "sess" / "bulkhead-abc" / "work"
    mem.mkdir(parents=True)
    (mem / "memory.memsw.limit_in_bytes").write_text("")
    cg = h.create("abc", "work", cgroup.limits_for(400))
    assert (mem / "memory.limit_in_bytes").read_text() == str(560 * MIB)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(560 * MIB)
    assert (root / "pids" / "bulkhead-abc" / "work" / "pids.max").read_text() == "256"
    assert (root / "cpu" / "bulkhead-abc" / "work" / "cpu.shares").read_text() == "1024"
    dirs = (mem, root / "pids/bulkhead-abc/work", root / "cpu/bulkhead-abc/work")
    assert cg.procs_files == [d / "cgroup.procs" for d in dirs]
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cg.oom_kills() == 1


def test_v1_missing_controller_means_no_limits(tmp_path):
    root = v1_tree(tmp_path)
    (root / "pids" / "cgroup.procs").unlink()
    assert cgroup.detect(root, "8:pids:/\n4:memory:/sess\n1:cpu:/\n") is None


def test_v2_detect_create_and_events(tmp_path):
    root = tmp_path
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    base = root / "system.slice" / "bulkhead.service"
    base.mkdir(parents=True)
    h = cgroup.detect(root, "0::/system.slice/bulkhead.service\n")
    assert isinstance(h, cgroup.V2Hierarchy) and h.bases == {"": base}
    cg = h.create("abc", "work", cgroup.limits_for(400))
    d = base / "bulkhead-abc" / "work"
    assert (d / "memory.max").read_text() == str(560 * MIB)
    assert (d / "pids.max").read_text() == "256" and (d / "cpu.weight").read_text() == "100"
    for parent in (base, base / "bulkhead-abc"):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert cg.procs_files == [d / "cgroup.procs"]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1


def test_v2_without_memory_controller_means_no_limits(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu pids\n")
    assert cgroup.detect(tmp_path, "0::/\n") is None


def test_stale_instances_are_collected(tmp_path):
    root = v1_tree(tmp_path)
    h = cgroup.detect(root, "8:pids:/\n4:memory:/sess\n1:cpu:/\n")
    assert h is not None
    runs = tmp_path / "run"
    (runs / "alive").mkdir(parents=True)
    for inst in ("alive", "gone"):
        for base in h.bases.values():
            (base / f"bulkhead-{inst}" / "work").mkdir(parents=True)
    h.collect_stale(runs)
    for base in h.bases.values():
        assert (base / "bulkhead-alive" / "work").is_dir()
        assert not (base / "bulkhead-gone").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a real cgroup")
def test_on_this_host_a_process_joins_and_the_cgroup_goes():
    import subprocess

    from bulkhead.backend.qemu import JOIN_CGROUPS

    h = cgroup.detect()
    if h is None:
        pytest.skip("no cgroup controllers here")
    cg = h.create(f"unittest{os.getpid()}", "probe", cgroup.limits_for(64))
    try:
        assert cg.memory_limit() == (64 + cgroup.QEMU_OVERHEAD_MIB) * MIB
        assert cg.pids_limit() == cgroup.PIDS_MAX
        out = subprocess.run(["/bin/sh", "-c", JOIN_CGROUPS, "sh", *map(str, cg.procs_files),
                              "--", "cat", "/proc/self/cgroup"],
                             capture_output=True, text=True, check=True).stdout
        assert f"bulkhead-unittest{os.getpid()}/probe" in out
    finally:
        cg.remove()
    assert not any(d.exists() for d in cg.dirs.values())
    assert not any(d.parent.exists() for d in cg.dirs.values())
