"""Each qube's QEMU in a jail of its own, so that escaping into QEMU gains little.

Under Qubes a guest that wants out must break Xen; here it must break QEMU, a
large program.  So, as Firecracker's jailer and libvirt's per-VM users do,
dom0 sets up a jail before QEMU runs (with bubblewrap, then ``setpriv``):

- **a uid and gid of its own**: ``uid_base + 256 * slot + qid``, from the range
  ``bulkhead setup`` reserves in ``/etc/subuid`` and ``/etc/subgid`` (so that
  the host's own tools never hand those ids out), one block of 256 ids per
  Bulkhead instance (:func:`instance_slot`), one id per qube (qids are < 256);
- **no capabilities** (effective, permitted, inheritable, ambient, bounding set
  all empty) and **no new privileges**;
- **its own mount namespace**, whose root is an empty read-only tmpfs holding
  only QEMU and the libraries it loads, its firmware and modules, this qube's
  kernel and disk images (each image of each backing chain, by the same path
  as on the host), a minimal ``/dev`` (plus ``/dev/kvm`` under KVM) and a
  private ``/proc``;
- **its own PID, IPC and UTS namespaces** (QEMU is PID 1 of its namespace), but
  dom0's network namespace, which holds only ``lo``;
- QEMU's own seccomp sandbox (``-sandbox on,...``) as before.

QEMU gets its QMP, agent and console sockets as already-listening file
descriptors made by dom0 (root-owned, in a root-only directory), so it needs no
writable directory at all; its ``-pidfile`` goes to a tiny private tmpfs.

Files: the image QEMU writes (the top of each chain) is given to the qube's
uid, mode 0600; the images below it, which a template's AppVMs share, stay
root's with a POSIX ACL entry letting this uid read them, nothing for others.

``BULKHEAD_JAIL=0`` in the daemon's environment runs QEMU unjailed, as root
(bench/boot.py measures the jail's cost that way); never do it otherwise.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
#: Which instance (``$BULKHEAD_HOME``) has which block of the range.
SLOT_REGISTRY = Path("/etc/bulkhead/qube-uid-slots")
RANGE_OWNER = "bulkhead"
#: The default range: above what useradd gives users (UID_MAX 60000) and
#: subordinate ids (SUB_UID_MAX 600100000 in Debian's login.defs).
DEFAULT_BASE = 700_000_000
SLOT_SIZE = 256            # qids are 1..254
DEFAULT_COUNT = SLOT_SIZE * 4096
#: Where QEMU's firmware and modules are, bound read-only when present.
QEMU_DATA = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu",
             "/usr/lib/x86_64-linux-gnu/qemu")
#: Debian's merged /usr: the top-level names are symlinks into it.
USR_LINKS = {"/lib": "usr/lib", "/lib64": "usr/lib64", "/bin": "usr/bin", "/sbin": "usr/sbin"}


class JailError(Exception):
    pass


def enabled() -> bool:
    """False only when ``BULKHEAD_JAIL=0`` (benchmarks' before/after)."""
    return os.environ.get("BULKHEAD_JAIL", "1").lower() not in ("0", "no", "false", "off")


# --- the uid range --------------------------------------------------------------------
@dataclass(frozen=True)
class IdRange:
    base: int
    count: int

    def ids_for(self, slot: int, qid: int) -> int:
        if not 0 < qid < SLOT_SIZE:
            raise JailError(f"qid {qid} out of range for a jail uid")
        uid = self.base + slot * SLOT_SIZE + qid
        if uid >= self.base + self.count:
            raise JailError(f"no jail uid left for slot {slot} in {self.base}+{self.count}")
        return uid


def read_range(subuid: Path = SUBUID, subgid: Path = SUBGID) -> IdRange:
    """The range ``bulkhead setup`` reserved: ``bulkhead:BASE:COUNT`` in both files."""
    found = []
    for path in (subuid, subgid):
        entry = None
        try:
            for line in path.read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == RANGE_OWNER:
                    entry = IdRange(int(parts[1]), int(parts[2]))
        except (OSError, ValueError):
            pass
        if entry is None:
            raise JailError(f"no uid range for qubes' QEMUs is reserved in {path} "
                            "(`bulkhead setup` reserves it)")
        found.append(entry)
    if found[0] != found[1]:
        raise JailError(f"the qube id ranges in {subuid} and {subgid} differ")
    return found[0]


def instance_slot(home: Path, count: int, registry: Path = SLOT_REGISTRY) -> int:
    """This instance's block in the range: looked up, or given the lowest free one.

    Homes that no longer exist (finished test runs) give their block back.
    """
    home_s = str(home)
    if "\n" in home_s:
        raise JailError("a home directory with a newline in its name")
    registry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(registry, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        entries: dict[int, str] = {}
        for line in f.read().splitlines():
            slot, _, h = line.partition(" ")
            if slot.isdigit():
                entries[int(slot)] = h
        for slot, h in entries.items():
            if h == home_s:
                return slot
        live = {s: h for s, h in entries.items() if os.path.isdir(h)}
        free = [s for s in range(count // SLOT_SIZE) if s not in live]
        if not free:
            raise JailError(f"every block of qube uids is taken (see {registry})")
        live[free[0]] = home_s
        f.seek(0)
        f.truncate()
        f.write("".join(f"{s} {h}\n" for s, h in sorted(live.items())))
        return free[0]


# --- files ------------------------------------------------------------------------------
def backing_chain(image: Path, fmt: str) -> list[Path]:
    """The images ``image`` (a qcow2) reads through, below it, top first.

    Read from the qcow2 headers (written by dom0's own qemu-img): the backing
    file name at offset 8 (u64 offset) and 16 (u32 length); relative names are
    relative to the directory of the image naming them.
    """
    chain: list[Path] = []
    current, current_fmt = image, fmt
    while current_fmt == "qcow2" and len(chain) < 256:
        with open(current, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                raise JailError(f"{current} is not a qcow2 image")
            offset, length = struct.unpack(">QI", header[8:20])
            if offset == 0 or length == 0:
                break
            if length > 4096:
                raise JailError(f"{current}: backing file name too long")
            f.seek(offset)
            name = f.read(length).decode()
        if name.startswith("json:") or ":" in name.split("/")[0]:
            raise JailError(f"{current}: backing file {name!r} is not a plain path")
        nxt = Path(os.path.normpath(current.parent / name))
        chain.append(nxt)
        current = nxt   # our pools chain qcow2 images only
    return chain


# POSIX ACL in its xattr form (linux/posix_acl_xattr.h): a version, then
# (tag u16, perm u16, id u32) entries sorted by tag then id.
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_ACL_XATTR = "system.posix_acl_access"


def _acl_entries(path: Path) -> list[tuple[int, int, int]]:
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        mode = os.stat(path).st_mode
        return [(_USER_OBJ, (mode >> 6) & 7, _NO_ID), (_GROUP_OBJ, (mode >> 3) & 7, _NO_ID),
                (_OTHER, mode & 7, _NO_ID)]
    (version,) = struct.unpack_from("<I", raw)
    if version != _ACL_VERSION:
        raise JailError(f"{path}: unknown ACL version {version}")
    return [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]


def grant_read(path: Path, uid: int) -> None:
    """Let ``uid`` read ``path`` (besides its owner); group and others get nothing."""
    kept = [(t, p, i) for t, p, i in _acl_entries(path)
            if t in (_USER_OBJ, _USER, _GROUP) and not (t == _USER and i == uid)]
    entries = kept + [(_USER, 4, uid), (_GROUP_OBJ, 0, _NO_ID), (_OTHER, 0, _NO_ID)]
    mask = 0
    for t, p, _ in entries:
        if t in (_USER, _GROUP, _GROUP_OBJ):
            mask |= p
    entries.append((_MASK, mask, _NO_ID))
    entries.sort(key=lambda e: (e[0], e[2]))
    raw = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, _ACL_XATTR, raw)


def give(path: Path, uid: int, gid: int) -> None:
    """Make ``path`` this qube's alone (and root's)."""
    os.chown(path, uid, gid)
    os.chmod(path, 0o600)
    try:
        os.removexattr(path, _ACL_XATTR)   # no ACL entry left from an earlier life
    except OSError:
        pass


def take_back(path: Path, mode: int = 0o600) -> None:
    """Make ``path`` dom0's again after a jailed QEMU had it (see :func:`give`): root's,
    ``mode``, and no ACL entry of any qube's uid left on it."""
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
    try:
        os.removexattr(path, _ACL_XATTR)
    except OSError:
        pass
    os.chmod(path, mode)


# --- what QEMU needs to run --------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def shared_objects(*programs: str) -> tuple[str, ...]:
    """The shared libraries ``programs`` load (from ``ldd``: dom0's own binaries)."""
    out: list[str] = []
    for program in programs:
        r = subprocess.run(["ldd", program], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise JailError(f"ldd {program} failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m and m.group(1) not in out:
                out.append(m.group(1))
    return tuple(out)


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``/a``, ``/a/b``, ``/a/b/c`` (not ``/``)."""
    out, parts = [], [p for p in path.split("/") if p]
    for i in range(len(parts)):
        out.append("/" + "/".join(parts[:i + 1]))
    return out


def _inside(path: str) -> str:
    """Where ``path`` is inside the jail: through /usr where the host's top-level name is
    a merged-/usr symlink (the jail has the same symlinks)."""
    for link, target in USR_LINKS.items():
        if path == link or path.startswith(link + "/"):
            return "/" + target + path[len(link):]
    return path


@dataclass(frozen=True)
class Jail:
    """One qube's jail: who QEMU runs as and what it sees."""

    uid: int
    gid: int
    kvm: bool = False

    def command(self, qemu_argv: list[str], *, ro_files: list[Path], rw_files: list[Path],
                pid_dir: Path, info_fd: int) -> list[str]:
        """bwrap + setpriv + QEMU's argv.  ``pid_dir``: a private tmpfs for ``-pidfile``."""
        qemu = qemu_argv[0] if qemu_argv[0].startswith("/") else f"/usr/bin/{qemu_argv[0]}"
        argv = [BWRAP, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--as-pid-1", "--new-session", "--info-fd", str(info_fd)]
        for link, target in USR_LINKS.items():
            argv += ["--symlink", target, link]
        binds: dict[str, str] = {}
        # QEMU's modules (its TCG accelerator among them) need no library QEMU does not.
        for lib in shared_objects(qemu, SETPRIV):
            binds.setdefault(_inside(lib), lib)
        for path in (qemu, SETPRIV, "/etc/ld.so.cache", *QEMU_DATA):
            if os.path.exists(path):
                binds.setdefault(_inside(path), path)
        mounts = [("--ro-bind", src, dest) for dest, src in binds.items()]
        mounts += [("--ro-bind", str(p), str(p)) for p in ro_files]
        mounts += [("--bind", str(p), str(p)) for p in rw_files]
        # bwrap makes the directories a mount needs mode 0700: QEMU, no longer root
        # when it loads its libraries, could not walk them.  Make them 0755 first.
        parents: set[str] = {str(pid_dir.parent)}
        for _, _, dest in mounts:
            parents.add(os.path.dirname(dest))
        for d in sorted({a for p in parents for a in _ancestors(p)}):
            argv += ["--perms", "0755", "--dir", d]
        for kind, src, dest in mounts:
            argv += [kind, src, dest]
        argv += ["--dev", "/dev", "--proc", "/proc"]
        if self.kvm:
            argv += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
        argv += ["--size", "65536", "--perms", "0777", "--tmpfs", str(pid_dir),
                 "--remount-ro", "/", "--chdir", "/", "--"]
        groups = ["--clear-groups"]
        if self.kvm:
            groups = [f"--groups={kvm_gid()}"]
        argv += [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}", *groups,
                 "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                 "--no-new-privs", "--", qemu, *qemu_argv[1:]]
        return argv


def kvm_gid() -> int:
    import grp

    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return os.stat("/dev/kvm").st_gid
