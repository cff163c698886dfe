"""The jail's pieces without starting QEMU: ids, backing chains, file rights, bwrap's argv."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from bulkhead.backend import jail
from bulkhead.backend.jail import IdRange, Jail, JailError


def qcow2(path: Path, backing: str | None = None) -> Path:
    """A file with just enough of a qcow2 header for the chain reader."""
    name = backing.encode() if backing else b""
    header = b"QFI\xfb" + struct.pack(">I", 3)
    header += struct.pack(">QI", 512 if name else 0, len(name))
    path.write_bytes(header.ljust(512, b"\0") + name)
    return path


def test_chain_follows_relative_and_absolute_names(tmp_path):
    tpl = tmp_path / "vm-templates" / "debian-12" / "root"
    tpl.mkdir(parents=True)
    base = qcow2(tpl / "img-1-aaaaaaaa.qcow2")
    cur = qcow2(tpl / "img-2-bbbbbbbb.qcow2", "img-1-aaaaaaaa.qcow2")
    own = tmp_path / "appvms" / "work" / "root"
    own.mkdir(parents=True)
    top = qcow2(own / "dirty.qcow2", "../../../vm-templates/debian-12/root/img-2-bbbbbbbb.qcow2")
    assert jail.backing_chain(top, "qcow2") == [cur, base]
    top2 = qcow2(own / "other.qcow2", str(cur))
    assert jail.backing_chain(top2, "qcow2") == [cur, base]
    assert jail.backing_chain(top, "raw") == []


@pytest.mark.parametrize("name", ["json:{\"file\": {}}", "nbd://host/x", "https://example/x"])
def test_chain_refuses_what_is_not_a_plain_path(tmp_path, name):
    with pytest.raises(JailError):
        jail.backing_chain(qcow2(tmp_path / "top.qcow2", name), "qcow2")


def test_chain_refuses_a_non_qcow2(tmp_path):
    p = tmp_path / "x.qcow2"
    p.write_bytes(b"not an image" * 10)
    with pytest.raises(JailError):
        jail.backing_chain(p, "qcow2")


def test_ids_one_block_per_instance_one_id_per_qube():
    r = IdRange(700_000_000, 256 * 4)
    assert r.ids_for(0, 1) == 700_000_001
    assert r.ids_for(2, 254) == 700_000_000 + 2 * 256 + 254
    for bad_qid in (0, 256):
        with pytest.raises(JailError):
            r.ids_for(0, bad_qid)
    with pytest.raises(JailError):
        r.ids_for(4, 1)          # past the reserved range


def test_read_range_needs_the_same_entry_in_both_files(tmp_path):
    su, sg = tmp_path / "subuid", tmp_path / "subgid"
    su.write_text("alice:100000:65536\nbulkhead:700000000:1048576\n")
    sg.write_text("bulkhead:700000000:1048576\n")
    assert jail.read_range(su, sg) == IdRange(700_000_000, 1_048_576)
    sg.write_text("bulkhead:700000000:65536\n")
    with pytest.raises(JailError):
        jail.read_range(su, sg)
    sg.unlink()
    with pytest.raises(JailError, match="bulkhead setup"):
        jail.read_range(su, sg)


def test_instance_slots_are_stable_and_given_back(tmp_path):
    reg = tmp_path / "slots"
    homes = [tmp_path / f"home{i}" for i in range(3)]
    for h in homes:
        h.mkdir()
    assert [jail.instance_slot(h, 256 * 8, reg) for h in homes] == [0, 1, 2]
    assert jail.instance_slot(homes[1], 256 * 8, reg) == 1       # the same home, the same block
    shutil.rmtree(homes[0])                                       # a finished test run
    new = tmp_path / "new"
    new.mkdir()
    assert jail.instance_slot(new, 256 * 8, reg) == 0
    with pytest.raises(JailError):
        jail.instance_slot(tmp_path / "x", 256 * 2, reg)          # every block taken
    with pytest.raises(JailError):
        jail.instance_slot(Path("/tmp/evil\n0 /"), 256 * 8, reg)


def acl(path: Path) -> str:
    return subprocess.run(["getfacl", "-cn", str(path)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def open_dir():
    """A directory every uid may walk into (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="bulkhead-jail-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_give_and_grant_read(open_dir):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    top, below = open_dir / "dirty.qcow2", open_dir / "img-1.qcow2"
    top.write_bytes(b"x")
    below.write_bytes(b"y")
    os.chmod(below, 0o644)
    jail.give(top, 700_000_005, 700_000_005)
    st = top.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (700_000_005, 700_000_005, 0o600)
    jail.grant_read(below, 700_000_005)
    jail.grant_read(below, 700_000_006)
    jail.grant_read(below, 700_000_005)     # idempotent
    st = below.stat()
    assert st.st_uid == 0 and st.st_mode & 0o007 == 0     # nothing for others
    entries = jail._acl_entries(below)
    assert (jail._USER, 4, 700_000_005) in entries and (jail._USER, 4, 700_000_006) in entries
    assert sum(1 for e in entries if e[0] == jail._USER) == 2
    if shutil.which("getfacl"):
        text = acl(below)
        assert "user:700000005:r--" in text and "other::---" in text
    # Opening as those uids works, as a third does not.
    for uid, ok in ((700_000_005, True), (700_000_007, False)):
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "cat", str(below)], capture_output=True)
        assert (r.returncode == 0) == ok


def test_bwrap_argv_drops_everything_and_binds_only_what_is_named(tmp_path):
    disk, base, kernel = tmp_path / "dirty.qcow2", tmp_path / "img-1.qcow2", tmp_path / "vmlinux"
    run = Path("/run/bulkhead/x/qubes/work")
    qemu = ["qemu-system-x86_64", "-name", "guest=work", "-pidfile", str(run / "qemu.pid")]
    argv = Jail(uid=700_000_003, gid=700_000_003).command(
        qemu, ro_files=[kernel, base], rw_files=[disk], pid_dir=run, info_fd=5)
    assert argv[0] == jail.BWRAP
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--as-pid-1", "--new-session"):
        assert flag in argv
    assert "--unshare-net" not in argv and "--share-net" not in argv   # dom0's (empty) netns
    assert "--die-with-parent" not in argv   # QEMU outlives a restarting daemon
    binds = [(argv[i], argv[i + 1], argv[i + 2]) for i, a in enumerate(argv)
             if a in ("--bind", "--ro-bind", "--dev-bind")]
    writable = [b for b in binds if b[0] != "--ro-bind"]
    assert writable == [("--bind", str(disk), str(disk))]
    assert ("--ro-bind", str(base), str(base)) in binds
    assert ("--ro-bind", str(kernel), str(kernel)) in binds
    # Nothing but libraries, QEMU, setpriv, its firmware/modules and the named files.
    allowed = (str(tmp_path), "/usr/lib", "/usr/lib64", "/usr/bin/qemu-system-x86_64",
               "/usr/bin/setpriv", "/etc/ld.so.cache", "/usr/share/qemu", "/usr/share/seabios")
    assert all(b[2].startswith(allowed) for b in binds), [b for b in binds
                                                          if not b[2].startswith(allowed)]
    assert not any(b[2] in ("/", "/usr", "/etc", "/run", "/var", "/home", "/dev/kvm")
                   for b in binds)
    # Its pid file goes to a small private tmpfs at the run directory's path.
    i = argv.index("--tmpfs")
    assert argv[i + 1] == str(run) and argv[i - 4:i - 2] == ["--size", "65536"]
    sep = argv.index("--")
    priv = argv[sep + 1:]
    assert priv[0] == jail.SETPRIV
    for flag in ("--reuid=700000003", "--regid=700000003", "--clear-groups", "--no-new-privs",
                 "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"):
        assert flag in priv
    assert priv[priv.index("--") + 1:] == ["/usr/bin/qemu-system-x86_64", *qemu[1:]]


def test_kvm_gets_its_device_and_group_only_under_kvm(tmp_path):
    tcg = Jail(uid=700_000_003, gid=700_000_003).command(
        ["qemu-system-x86_64"], ro_files=[], rw_files=[], pid_dir=tmp_path, info_fd=5)
    assert "/dev/kvm" not in tcg and not any(a.startswith("--groups") for a in tcg)
    if not os.path.exists("/dev/kvm"):
        return
    kvm = Jail(uid=700_000_003, gid=700_000_003, kvm=True).command(
        ["qemu-system-x86_64"], ro_files=[], rw_files=[], pid_dir=tmp_path, info_fd=5)
    i = kvm.index("--dev-bind")
    assert kvm[i + 1:i + 3] == ["/dev/kvm", "/dev/kvm"]
    assert f"--groups={jail.kvm_gid()}" in kvm and "--clear-groups" not in kvm


def test_switch(monkeypatch):
    monkeypatch.delenv("BULKHEAD_JAIL", raising=False)
    assert jail.enabled()
    for off in ("0", "no", "false"):
        monkeypatch.setenv("BULKHEAD_JAIL", off)
        assert not jail.enabled()
