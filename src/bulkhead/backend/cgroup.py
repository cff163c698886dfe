"""Per-qube cgroups: what each qube's QEMU may use of the host, and what it did use.

Every running qube's QEMU lives in a cgroup of its own,
``<the daemon's cgroup>/bulkhead-<instance>/<qube>``, with

- a **memory limit**: the qube's memory plus :data:`QEMU_OVERHEAD_MIB` (see
  :func:`limits_for`).  A QEMU that goes over it is killed by the kernel's OOM
  killer -- only that QEMU, as nothing else is in its cgroup -- and since it
  vanishes without a clean shutdown the qube shows as Crashed;
- a **pids limit** (:data:`PIDS_MAX`): QEMU's threads, with room to spare;
- a **CPU weight**, the same for every qube, so that a busy qube cannot starve
  the others or dom0's daemon (``cpu.weight`` on v2, ``cpu.shares`` on v1).

Laptops mount cgroup v2 only; some machines (these test machines among them)
mount only v1 controllers, one hierarchy each.  :func:`detect` picks whichever
the host has and the rest of Bulkhead sees one interface, :class:`QubeCgroup`.
The cgroups hang under the daemon's own cgroup, never beside it: whatever
limits the daemon is under (a systemd unit, a container) still bound its qubes.

A process joins a cgroup by writing ``0`` (itself) into the group's
``cgroup.procs``: :attr:`QubeCgroup.procs_files` are what the launcher writes
before it execs QEMU, so that QEMU's first allocation is already accounted.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")

#: QEMU's own memory on top of the guest's RAM, in MiB.  Measured under TCG
#: (QEMU 7.2, microvm, 1 vCPU): ~45 MiB of QEMU code, heap and libraries, plus
#: the TCG translation cache (``tb-size``, 32 MiB), plus the host page cache its
#: disk reads are charged for (reclaimable: the kernel trims it before killing).
#: Under KVM there is no translation cache, but the budget stays the same: it is
#: a ceiling against a runaway QEMU, not a reservation.
QEMU_OVERHEAD_MIB = 160
#: Processes and threads: QEMU's main loop, RCU and vCPU threads plus its block
#: layer's worker pool (up to 64 threads), the jail's monitor process.
PIDS_MAX = 256
#: cgroup v2 ``cpu.weight`` of each qube (v2's default is 100); v1's ``cpu.shares``
#: gets the same proportion of its default 1024.
CPU_WEIGHT = 100


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpu_weight: int  # cgroup v2 scale, 1..10000

    @property
    def cpu_shares(self) -> int:
        """The weight on cgroup v1's scale (``cpu.shares``, default 1024)."""
        return max(2, self.cpu_weight * 1024 // 100)


def limits_for(memory_mib: int) -> Limits:
    """The limits of a qube with ``memory_mib`` of RAM."""
    return Limits(memory_bytes=(memory_mib + QEMU_OVERHEAD_MIB) * 1024 * 1024,
                  pids=PIDS_MAX, cpu_weight=CPU_WEIGHT)


class CgroupError(Exception):
    pass


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}: {e.strerror}") from e


def _read_key(path: Path, key: str) -> int:
    """The number after ``key`` in a flat-keyed file (``memory.events``, ``memory.oom_control``)."""
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


class QubeCgroup:
    """One qube's cgroup (one directory on v2, one per controller on v1)."""

    def __init__(self, dirs: dict[str, Path], v2: bool) -> None:
        self.dirs = dirs      # controller ("memory", "pids", "cpu"; "" on v2) -> directory
        self.v2 = v2

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    @property
    def memory_dir(self) -> Path:
        return self.dirs["" if self.v2 else "memory"]

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for going over its memory limit."""
        if self.v2:
            return _read_key(self.memory_dir / "memory.events", "oom_kill")
        return _read_key(self.memory_dir / "memory.oom_control", "oom_kill")

    def memory_limit(self) -> int:
        name = "memory.max" if self.v2 else "memory.limit_in_bytes"
        return int((self.memory_dir / name).read_text().strip())

    def pids_limit(self) -> int:
        d = self.dirs["" if self.v2 else "pids"]
        return int((d / "pids.max").read_text().strip())

    def remove(self) -> None:
        """Remove the (empty) cgroup, and its instance's when that is empty too; a cgroup
        still holding a process stays."""
        for d in dict.fromkeys(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                continue
            try:
                d.parent.rmdir()
            except OSError:
                pass   # other qubes of the instance still run


class Hierarchy:
    """Where this daemon's qube cgroups live, on the host's cgroup version."""

    v2: bool = False

    def __init__(self, bases: dict[str, Path]) -> None:
        self.bases = bases    # controller -> the daemon's own cgroup directory for it

    def describe(self) -> str:
        return ", ".join(f"{c or 'v2'}: {p}" for c, p in self.bases.items())

    def group(self, instance: str, name: str) -> QubeCgroup:
        """The cgroup of qube ``name`` (it may not exist)."""
        return QubeCgroup({c: b / f"bulkhead-{instance}" / name for c, b in self.bases.items()},
                          self.v2)

    def create(self, instance: str, name: str, limits: Limits) -> QubeCgroup:
        raise NotImplementedError

    def remove_instance(self, instance: str) -> None:
        """Remove an instance's cgroups whose QEMUs are all gone."""
        for base in dict.fromkeys(self.bases.values()):
            top = base / f"bulkhead-{instance}"
            for d in [*(p for p in top.iterdir() if p.is_dir()), top] if top.is_dir() else []:
                if d.name == "daemon":
                    continue
                try:
                    d.rmdir()
                except OSError:
                    pass   # a process still in it, or a child cgroup left

    def collect_stale(self, run_root: Path) -> None:
        """Remove the cgroups of instances that no longer exist on this host (no run
        directory: a finished test run, a host reboot), so that none pile up."""
        for base in dict.fromkeys(self.bases.values()):
            try:
                tops = [p for p in base.iterdir() if p.name.startswith("bulkhead-")]
            except OSError:
                continue
            for top in tops:
                instance = top.name.removeprefix("bulkhead-")
                if not (run_root / instance).exists():
                    self.remove_instance(instance)


class V1Hierarchy(Hierarchy):
    """cgroup v1: one hierarchy per controller (memory, pids, cpu)."""

    CONTROLLERS = ("memory", "pids", "cpu")

    def create(self, instance: str, name: str, limits: Limits) -> QubeCgroup:
        cg = self.group(instance, name)
        for d in cg.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        mem = cg.dirs["memory"]
        # Swap must not extend the limit (where swap accounting exists at all).  The
        # kernel wants limit <= memsw at every step: lift memsw first (a cgroup left
        # from an earlier start may have a lower one).
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, "-1")
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        if memsw.exists():
            _write(memsw, str(limits.memory_bytes))
        _write(cg.dirs["pids"] / "pids.max", str(limits.pids))
        _write(cg.dirs["cpu"] / "cpu.shares", str(limits.cpu_shares))
        return cg


class V2Hierarchy(Hierarchy):
    """cgroup v2: one tree; controllers are enabled down to the qubes' parent."""

    v2 = True
    CONTROLLERS = ("memory", "pids", "cpu")

    def _enable(self, d: Path) -> None:
        want = " ".join("+" + c for c in self.CONTROLLERS)
        try:
            with open(d / "cgroup.subtree_control", "w") as f:
                f.write(want)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(f"cannot enable {want} in {d}: {e.strerror}") from e
            # v2's rule: a cgroup with processes in it cannot hand controllers to
            # children.  Under systemd (Delegate=yes) the daemon is alone in its
            # service's cgroup: it moves itself into a leaf of its own.  Anywhere
            # else (a login session's scope) others' processes stay, and this fails.
            leaf = d / "daemon"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(d / "cgroup.subtree_control", want)

    def create(self, instance: str, name: str, limits: Limits) -> QubeCgroup:
        base = self.bases[""]
        cg = self.group(instance, name)
        parent = cg.dirs[""].parent
        parent.mkdir(exist_ok=True)
        self._enable(base)
        self._enable(parent)
        cg.dirs[""].mkdir(exist_ok=True)
        d = cg.dirs[""]
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(limits.pids))
        _write(d / "cpu.weight", str(limits.cpu_weight))
        return cg


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller -> path, from ``/proc/self/cgroup`` (v2's line has the controller "")."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            out[controller] = parts[2]
    return out


def detect(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> Hierarchy | None:
    """The host's cgroup hierarchy for qubes, or None where the controllers are missing."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    own = _own_paths(proc_cgroup)
    controllers_file = root / "cgroup.controllers"
    if controllers_file.exists():   # the root is a cgroup2 mount: v2 only
        have = controllers_file.read_text().split()
        if not all(c in have for c in V2Hierarchy.CONTROLLERS):
            return None
        return V2Hierarchy({"": root / own.get("", "/").lstrip("/")})
    bases = {}
    for c in V1Hierarchy.CONTROLLERS:
        if not (root / c / "cgroup.procs").exists() or c not in own:
            return None
        bases[c] = root / c / own[c].lstrip("/")
    return V1Hierarchy(bases)
