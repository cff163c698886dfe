"""QEMU's command line for a qube (bulkhead.backend.qemu_argv.build_argv / kernel_cmdline).

Nothing is started: these tests read the argv the way QEMU would -- option by
option, and each option's value as QEMU's ``key=value,key=value`` syntax in
which ``,,`` is a literal comma -- and check what the qube gets: the machine
type, the disks in Qubes' order, the agent's port, the sockets dom0 talks to,
the sandbox, and no network device at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bulkhead.backend import qemu_argv as qemu
from bulkhead.backend.accel import Accel
from bulkhead.backend.base import DiskSpec, MachineSpec

KVM = Accel("kvm", "test")
TCG = Accel("tcg", "test")
RUN = Path("/run/bulkhead/qubes/work")


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch):
    # The command line carries the host's TSC frequency; fix it so tests don't read the host.
    monkeypatch.setattr(qemu, "host_tsc_khz", lambda: 2_345_678)
    # A developer's override of the TCG CPU model must not leak into these tests.
    monkeypatch.delenv("BULKHEAD_TCG_CPU", raising=False)


def disks() -> tuple[DiskSpec, ...]:
    base = Path("/var/lib/bulkhead/appvms/work")
    return (
        DiskSpec("root", base / "root/dirty.qcow2"),
        DiskSpec("private", base / "private/dirty.qcow2"),
        DiskSpec("volatile", base / "volatile/dirty.qcow2"),
        DiskSpec("kernel-mods", Path("/var/lib/bulkhead/vm-kernels/k/modules.img"),
                 fmt="raw", readonly=True),
    )


def pvh(**kw) -> MachineSpec:
    args = dict(name="work", qid=3, memory_mib=400, vcpus=2, virt_mode="pvh",
                kernel=Path("/var/lib/bulkhead/vm-kernels/6.1-bh/vmlinux"), kernelopts="",
                disks=disks())
    args.update(kw)
    return MachineSpec(**args)


def hvm(**kw) -> MachineSpec:
    return pvh(virt_mode="hvm", kernel=None, **kw)


def qemu_opts(value: str) -> dict[str, str]:
    """Parse QEMU's option syntax: split on ',' except ',,' (a literal comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    out = {}
    for n, p in enumerate(parts):
        k, sep, v = p.partition("=")
        if sep:
            out[k] = v
        elif n == 0:
            out[""] = p          # the implied first key: device/backend type, machine name
        else:
            out[p] = "on"        # a bare flag
    return out


def values(argv: list[str], option: str) -> list[str]:
    """Every value given to ``option``, in order."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def devices(argv: list[str]) -> list[dict[str, str]]:
    return [qemu_opts(v) for v in values(argv, "-device")]


def device_names(argv: list[str]) -> list[str]:
    return [d[""] for d in devices(argv)]


# --- pvh: a direct-boot microvm ------------------------------------------------------------

def test_pvh_is_a_direct_boot_microvm():
    spec = pvh()
    argv = qemu.build_argv(spec, TCG, RUN)
    assert argv[0] == qemu.QEMU
    assert all(isinstance(a, str) for a in argv)
    [machine] = values(argv, "-M")
    assert qemu_opts(machine)[""] == "microvm"
    assert values(argv, "-kernel") == [str(spec.kernel)]
    assert values(argv, "-append") == [qemu.kernel_cmdline(spec, TCG)]
    assert values(argv, "-initrd") == []
    assert values(argv, "-m") == ["400"] and values(argv, "-smp") == ["2"]
    assert values(argv, "-name") == ["guest=work,debug-threads=on"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv


def test_pvh_initrd_when_given():
    argv = qemu.build_argv(pvh(initrd=Path("/boot/initrd.img")), TCG, RUN)
    assert values(argv, "-initrd") == ["/boot/initrd.img"]


def test_disks_in_order_with_serials():
    argv = qemu.build_argv(pvh(), TCG, RUN)
    drives = [qemu_opts(v) for v in values(argv, "-drive")]
    assert [d["id"] for d in drives] == ["root", "private", "volatile", "kernel-mods"]
    for d, spec in zip(drives, disks()):
        assert d["file"] == str(spec.path)
        assert d["format"] == spec.fmt
        assert d["if"] == "none"
    blk = [d for d in devices(argv) if d[""].startswith("virtio-blk")]
    # The guest finds its volumes by serial (/dev/disk/by-id/virtio-private), and the
    # first disk is /dev/vda, the root= of the kernel command line.
    assert [(d[""], d["drive"], d["serial"]) for d in blk] == [
        ("virtio-blk-device", n, n) for n in ("root", "private", "volatile", "kernel-mods")]


def test_readonly_only_where_asked():
    drives = {d["id"]: d for d in (qemu_opts(v) for v in values(qemu.build_argv(pvh(), TCG, RUN),
                                                                  "-drive"))}
    assert drives["kernel-mods"].get("readonly") == "on"
    assert all("readonly" not in drives[n] for n in ("root", "private", "volatile"))


def chardev_path(argv, chardev_id):
    return {c["id"]: c for c in (qemu_opts(v) for v in values(argv, "-chardev"))}[chardev_id]["path"]


def test_agent_port_rng_and_sockets_in_the_run_dir():
    argv = qemu.build_argv(pvh(), TCG, RUN)
    names = device_names(argv)
    assert "virtio-serial-device" in names
    assert "virtio-rng-device" in names
    ports = {d["name"]: d for d in devices(argv) if d[""] == "virtserialport"}
    port = ports["org.qubes-os.qrexec"]
    assert port["name"] == qemu.AGENT_PORT
    # The GUI's port, on the same virtio-serial device (issue 10).
    assert chardev_path(argv, ports["org.bulkhead.gui"]["chardev"]) == str(RUN / "gui.sock")
    chardevs = {c["id"]: c for c in (qemu_opts(v) for v in values(argv, "-chardev"))}
    assert chardevs[port["chardev"]][""] == "socket"
    assert chardevs[port["chardev"]]["path"] == str(RUN / "qrexec.sock")
    assert chardevs["console"]["path"] == str(RUN / "console.sock")
    for c in chardevs.values():
        # QEMU is the server and must not wait for dom0 before running the guest.
        assert c["server"] == "on" and c["wait"] == "off"
    assert values(argv, "-serial") == ["chardev:console"]
    assert chardevs["qmp"]["path"] == str(RUN / "qmp.sock")
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert values(argv, "-pidfile") == [str(RUN / "qemu.pid")]


def test_sockets_made_by_dom0_are_passed_as_descriptors():
    # The jailed QEMU cannot write the run directory: dom0 binds the sockets, QEMU listens.
    argv = qemu.build_argv(pvh(), TCG, RUN, fds={"qmp": 7, "qrexec": 8, "console": 9, "gui": 10})
    chardevs = {c["id"]: c for c in (qemu_opts(v) for v in values(argv, "-chardev"))}
    assert {k: c["fd"] for k, c in chardevs.items()} == {"qmp": "7", "qrexec": "8", "console": "9",
                                                              "gui": "10"}
    assert not any("path" in c for c in chardevs.values())
    # The run directory stays on the command line: it names the instance (adoption, cleanup).
    assert values(argv, "-pidfile") == [str(RUN / "qemu.pid")]


def test_balloon_reports_free_pages_and_shutdown_pauses_for_dom0():
    for spec, bus in ((pvh(), "device"), (hvm(), "pci")):
        argv = qemu.build_argv(spec, TCG, RUN)
        [balloon] = [d for d in devices(argv) if d[""].startswith("virtio-balloon")]
        assert balloon[""] == f"virtio-balloon-{bus}" and balloon["free-page-reporting"] == "on"
        assert values(argv, "-action") == ["shutdown=pause"] and "-no-reboot" in argv
    # A panic marks the BIOS reboot flag as warm: how dom0 tells it from a clean reboot.
    assert "reboot=t,panic_warm" in qemu.kernel_cmdline(pvh(), TCG).split()


def test_sandbox_denies_everything_qemu_does_not_need():
    [sandbox] = values(qemu.build_argv(pvh(), TCG, RUN), "-sandbox")
    opts = qemu_opts(sandbox)
    assert opts[""] == "on"
    for k in ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"):
        assert opts[k] == "deny"


@pytest.mark.parametrize("spec", [pvh(), hvm()], ids=["pvh", "hvm"])
def test_no_network_device(spec):
    # dom0 and every qube's QEMU have no network of their own: only explicit netvm links.
    argv = qemu.build_argv(spec, KVM, RUN)
    assert "-nodefaults" in argv       # else QEMU adds a default NIC
    for opt in ("-net", "-netdev", "-nic", "-usb", "-usbdevice"):
        assert opt not in argv
    for name in device_names(argv):
        assert "net" not in name and "e1000" not in name and "rtl8139" not in name


# --- hvm: a PC that boots its disk -----------------------------------------------------------

def test_hvm_is_a_q35_pc_with_pci_devices_and_no_kernel():
    argv = qemu.build_argv(hvm(), KVM, RUN)
    assert [qemu_opts(m)[""] for m in values(argv, "-M")] == ["q35"]
    for opt in ("-kernel", "-append", "-initrd"):
        assert opt not in argv
    names = device_names(argv)
    assert names.count("virtio-blk-pci") == 4
    assert "virtio-serial-pci" in names and "virtio-rng-pci" in names
    assert not any(n.endswith("-device") for n in names)   # no microvm (virtio-mmio) devices


def test_hvm_ignores_a_kernel_and_pvh_without_kernel_boots_the_disk():
    # hvm always boots from its disk; a pvh qube with kernel='' has nothing to boot directly.
    for spec in (pvh(virt_mode="hvm"), pvh(kernel=None)):
        argv = qemu.build_argv(spec, TCG, RUN)
        assert "-kernel" not in argv
        assert qemu_opts(values(argv, "-M")[0])[""] == "q35"


# --- acceleration -------------------------------------------------------------------------------

def test_kvm_accel_uses_the_host_cpu():
    argv = qemu.build_argv(pvh(), KVM, RUN)
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-cpu") == ["host"]


def test_tcg_accel_with_small_translation_cache_and_no_host_cpu():
    argv = qemu.build_argv(pvh(), TCG, RUN)
    [accel] = values(argv, "-accel")
    assert qemu_opts(accel) == {"": "tcg", "tb-size": str(qemu.TCG_TB_SIZE_MIB)}
    assert "-cpu" not in argv         # "-cpu host" needs KVM


# --- kernel command line --------------------------------------------------------------------------

def test_kernel_cmdline_contents():
    words = qemu.kernel_cmdline(pvh(), TCG).split()
    for w in ("console=ttyS0", "panic=-1", "root=/dev/vda", "rw", "rootfstype=ext4",
              "init=/usr/lib/bulkhead/init", "bulkhead.name=work", "tsc_early_khz=2345678"):
        assert w in words
    assert not any(w.startswith("bulkhead.resize_private") for w in words)


def test_kernel_cmdline_resize_flag_and_user_options_last():
    spec = pvh(kernelopts="nokaslr loglevel=7", extra={"resize_private": "1"})
    line = qemu.kernel_cmdline(spec, KVM)
    assert "bulkhead.resize_private=1" in line.split()
    # The qube's kernelopts come last, so the user can override our defaults.
    assert line.endswith(" nokaslr loglevel=7")


def test_resize_flag_needs_exactly_one():
    assert "resize_private" not in qemu.kernel_cmdline(pvh(extra={"resize_private": "0"}), TCG)


def test_paths_with_commas_are_escaped():
    run_dir = Path("/home/u/bulkhead,test/run/work")
    spec = pvh(disks=(DiskSpec("root", Path("/home/u/bulkhead,test/root.qcow2")),))
    argv = qemu.build_argv(spec, TCG, run_dir)
    [drive] = values(argv, "-drive")
    assert qemu_opts(drive)["file"] == "/home/u/bulkhead,test/root.qcow2"
    chardevs = {c["id"]: c for c in (qemu_opts(v) for v in values(argv, "-chardev"))}
    assert chardevs["qrexec"]["path"] == str(run_dir / "qrexec.sock")


@pytest.mark.parametrize("extra, mib", [
    ({}, 32),                                      # a cold boot
    ({"boot_state": "save"}, 32),                  # the boot that is saved
    ({"boot_state": "restore"}, 16),               # an AppVM's start, when asked for less
    ({"boot_state": "restore", "netvm": "1"}, 32),  # firewall changes: Python and nft
    ({"boot_state": "restore", "gui": "1"}, 32),    # the GUI agent: Python
])
def test_tcg_translation_cache_by_what_the_machine_runs(monkeypatch, extra, mib):
    monkeypatch.setattr(qemu, "TCG_TB_SIZE_MIB", 32)
    monkeypatch.setattr(qemu, "TCG_TB_SIZE_RESTORED_MIB", 16)
    argv = qemu.build_argv(pvh(extra=extra), TCG, Path("/run/q"))
    assert argv[argv.index("-accel") + 1] == f"tcg,tb-size={mib}"


def test_restored_qubes_keep_the_full_translation_cache_by_default():
    assert qemu.TCG_TB_SIZE_RESTORED_MIB == qemu.TCG_TB_SIZE_MIB
