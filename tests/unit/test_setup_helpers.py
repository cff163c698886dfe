"""Pure helpers of `bulkhead setup`: the kernel config check, the benchmark initramfs,
and the choice between KVM and TCG (bulkhead.backend.accel.detect)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bulkhead.backend import accel
from bulkhead.backend.accel import Accel
from bulkhead.setup import initramfs, kernel


# --- kernel config -------------------------------------------------------------------------

def test_requested_options_reads_assignments_only():
    text = """# a comment: CONFIG_COMMENTED=y
CONFIG_A=y
   CONFIG_B=m
# CONFIG_C is not set
CONFIG_D="console=ttyS0 root=/dev/vda"
CONFIG_NR_CPUS=8

NOT_CONFIG=y
"""
    assert kernel.requested_options(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "m",
        # Only the first '=' separates: a string value may contain more.
        "CONFIG_D": '"console=ttyS0 root=/dev/vda"',
        "CONFIG_NR_CPUS": "8",
    }


def test_check_config_accepts_what_was_asked():
    config = """CONFIG_A=y
CONFIG_NR_CPUS=8
# CONFIG_ACPI is not set
CONFIG_EXTRA=y
"""
    wanted = {"CONFIG_A": "y", "CONFIG_NR_CPUS": "8", "CONFIG_ACPI": "n", "CONFIG_ABSENT": "n"}
    # "=n" is satisfied by "is not set" and by the option not appearing at all.
    assert kernel.check_config(config, wanted) == []


def test_check_config_reports_each_option_that_did_not_survive():
    config = """CONFIG_A=m
CONFIG_NR_CPUS=64
CONFIG_MODULES=y
"""
    wanted = {"CONFIG_A": "y", "CONFIG_NR_CPUS": "8", "CONFIG_MODULES": "n",
              "CONFIG_VIRTIO_BLK": "y"}
    assert sorted(kernel.check_config(config, wanted)) == sorted([
        "CONFIG_A=y (got m)",                # built as a module instead
        "CONFIG_NR_CPUS=8 (got 64)",
        "CONFIG_MODULES=n (got y)",          # asked off, came back on
        "CONFIG_VIRTIO_BLK=y (got n)",       # dropped: a dependency is missing
    ])


def test_the_shipped_fragment_is_consistent_and_has_what_a_qube_needs():
    wanted = kernel.requested_options(kernel.fragment_text())
    # A .config identical to the fragment passes its own check.
    assert kernel.check_config(kernel.fragment_text(), wanted) == []
    # What build_argv's machine gives the guest must be built in: virtio over MMIO
    # (microvm) and PCI (q35), the disk, the agent's virtio-serial port, the RNG,
    # ext4 root, the serial console, PVH entry, and nftables for firewall qubes.
    for opt in ("VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_PCI", "VIRTIO_BLK",
                "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO", "EXT4_FS", "SERIAL_8250_CONSOLE",
                "PVH", "NF_TABLES"):
        assert wanted.get(f"CONFIG_{opt}") == "y", opt
    assert wanted.get("CONFIG_MODULES") == "n"      # no modules: nothing to load from the qube


# --- the benchmark initramfs -----------------------------------------------------------------

def parse_newc(blob: bytes) -> list[dict]:
    """Read a cpio "newc" archive independently of the code that wrote it."""
    entries, off = [], 0
    while True:
        assert blob[off:off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, check = fields
        name_start = off + 110
        name = blob[name_start:name_start + namesize]
        assert name.endswith(b"\0"), "names are NUL-terminated"
        data_start = name_start + namesize
        data_start += -data_start % 4                     # header+name padded to 4
        data = blob[data_start:data_start + size]
        off = data_start + size
        off += -off % 4                                   # data padded to 4
        entry = dict(name=name[:-1].decode(), mode=mode, size=size, data=data, check=check)
        if entry["name"] == "TRAILER!!!":
            assert blob[off:].strip(b"\0") == b"", "nothing but padding after the trailer"
            return entries
        entries.append(entry)


@pytest.fixture
def built(tmp_path):
    if not initramfs.BUSYBOX.exists() or shutil.which("busybox") is None:
        pytest.skip("needs /bin/busybox (busybox-static)")
    return initramfs.build(tmp_path / "out" / "bare.cpio")


def test_initramfs_is_a_valid_newc_archive(built):
    blob = built.read_bytes()
    assert len(blob) % 512 == 0
    entries = {e["name"]: e for e in parse_newc(blob)}
    assert list(entries) == ["dev", "bin", "bin/busybox", "init"]
    assert stat.S_ISDIR(entries["dev"]["mode"]) and stat.S_ISDIR(entries["bin"]["mode"])
    for name in ("bin/busybox", "init"):
        assert stat.S_ISREG(entries[name]["mode"])
        assert entries[name]["mode"] & 0o111, f"{name} must be executable"
    assert entries["init"]["data"] == initramfs.INIT.encode()
    assert entries["bin/busybox"]["data"] == initramfs.BUSYBOX.read_bytes()
    assert initramfs.MARKER.encode() in entries["init"]["data"]
    assert entries["init"]["data"].startswith(b"#!/bin/busybox sh\n")
    # No leftover temporary file next to the result.
    assert [p.name for p in built.parent.iterdir()] == ["bare.cpio"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_initramfs_lists_and_extracts_with_cpio(built, tmp_path):
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(built, "rb"),
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["dev", "bin", "bin/busybox", "init"]
    assert listing.stderr == ""                       # no "junk", no "premature end"

    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"],
                       stdin=open(built, "rb"), cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (root / "init").read_text() == initramfs.INIT
    assert os.access(root / "init", os.X_OK)
    assert (root / "bin/busybox").read_bytes() == initramfs.BUSYBOX.read_bytes()
    assert (root / "dev").is_dir()


def test_initramfs_needs_busybox(tmp_path, monkeypatch):
    monkeypatch.setattr(initramfs, "BUSYBOX", tmp_path / "no-busybox")
    with pytest.raises(FileNotFoundError, match="busybox"):
        initramfs.build(tmp_path / "bare.cpio")
    assert not (tmp_path / "bare.cpio").exists()


# --- KVM or TCG --------------------------------------------------------------------------------

class Probe:
    """Stands in for probe_kvm (which would boot a kernel): counts calls, returns a set verdict."""

    def __init__(self, verdict: Accel) -> None:
        self.verdict = verdict
        self.calls = 0

    def __call__(self, kernel: Path, timeout: float = 0) -> Accel:
        self.calls += 1
        return self.verdict


@pytest.fixture
def probe(monkeypatch, tmp_path):
    p = Probe(Accel("kvm", "KVM booted a test kernel in 0.3 s"))
    monkeypatch.setattr(accel, "probe_kvm", p)
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 7.2.0")
    monkeypatch.setattr(accel, "_cpu_model", lambda: "Test CPU")
    monkeypatch.delenv("BULKHEAD_ACCEL", raising=False)
    return p


@pytest.fixture
def kernel_file(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF not really")
    return k


@pytest.mark.parametrize("forced", ["kvm", "tcg"])
def test_bulkhead_accel_overrides_without_probing(probe, tmp_path, monkeypatch, forced):
    monkeypatch.setenv("BULKHEAD_ACCEL", forced)
    cache = tmp_path / "cache"
    # The kernel need not even exist: nothing is probed.
    verdict = accel.detect(tmp_path / "missing-vmlinux", cache)
    assert verdict == Accel(forced, "set by BULKHEAD_ACCEL")
    assert probe.calls == 0
    assert not cache.exists()


def test_bulkhead_accel_wins_over_a_cached_verdict(probe, kernel_file, tmp_path, monkeypatch):
    accel.detect(kernel_file, tmp_path / "cache")             # caches kvm
    monkeypatch.setenv("BULKHEAD_ACCEL", "tcg")
    assert accel.detect(kernel_file, tmp_path / "cache").name == "tcg"


def test_verdict_is_probed_once_then_cached(probe, kernel_file, tmp_path):
    cache = tmp_path / "cache"
    first = accel.detect(kernel_file, cache)
    assert first == probe.verdict and probe.calls == 1
    assert (cache / "accel.json").exists()
    assert not (cache / "accel.tmp").exists()
    # A different answer from the probe now would not matter: the cache is used.
    probe.verdict = Accel("tcg", "would be different")
    second = accel.detect(kernel_file, cache)
    assert probe.calls == 1
    assert second.name == "kvm"
    assert second.reason == first.reason + " (cached)"


def test_empty_bulkhead_accel_means_unset(probe, kernel_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BULKHEAD_ACCEL", "")
    accel.detect(kernel_file, tmp_path / "cache")
    assert probe.calls == 1


def test_cache_is_invalidated_by_a_new_kernel_qemu_or_cpu(probe, kernel_file, tmp_path,
                                                           monkeypatch):
    cache = tmp_path / "cache"
    accel.detect(kernel_file, cache)
    assert probe.calls == 1

    # A rebuilt kernel (new mtime) is probed again.
    st = kernel_file.stat()
    os.utime(kernel_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    accel.detect(kernel_file, cache)
    assert probe.calls == 2

    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 8.0.0")
    accel.detect(kernel_file, cache)
    assert probe.calls == 3

    monkeypatch.setattr(accel, "_cpu_model", lambda: "Another CPU")
    accel.detect(kernel_file, cache)
    assert probe.calls == 4

    # ... and each new verdict is cached in turn.
    accel.detect(kernel_file, cache)
    assert probe.calls == 4


@pytest.mark.parametrize("content", [
    "not json", "", "{}", '{"key": 1}', '{"key": null, "name": "kvm"}',
    "[1, 2]", "null",
])
def test_damaged_cache_means_probing_again(probe, kernel_file, tmp_path, content):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "accel.json").write_text(content)
    assert accel.detect(kernel_file, cache) == probe.verdict
    assert probe.calls == 1
    # The damaged file was replaced with a good one.
    assert accel.detect(kernel_file, cache).reason.endswith("(cached)")
