"""QEMU's command line for a qube: machine, kernel, disks, channels.

Every value here comes from dom0 (the qube's definition, its volumes' paths),
never from a qube.  :mod:`bulkhead.backend.qemu` runs what this builds.
"""

from __future__ import annotations

import os
from pathlib import Path

from .accel import Accel, host_tsc_khz
from .base import MachineSpec

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.qubes-os.qrexec"
GUI_PORT = "org.bulkhead.gui"   # the GUI agent's port (bulkhead.guest.gui_protocol)
# TCG's translated-code cache: QEMU's default (1 GiB reserved, filled as code runs)
# inflates every machine's RSS.  32 MiB was measured best here: 16 makes boots 40 %
# slower, 64 gains ~3 % for +35 MiB.  BULKHEAD_TCG_TB_SIZE_MIB overrides it (tuning).
TCG_TB_SIZE_MIB = int(os.environ.get("BULKHEAD_TCG_TB_SIZE_MIB", "32"))
# A qube restored from a saved boot state (bulkhead.bootstate) never runs the boot,
# so it could do with less: a running qube fills whatever cache it has within
# minutes (translations are never given back).  16 MiB there saves 11-16 MiB per
# qube on the host, but measured in one hour: a trivial qrexec call 79 ms instead of
# 38, a restored start 567 ms instead of 451, Python-heavy commands ~20 % slower,
# and in sys-firewall a firewall change 1.6 s instead of 0.6 s.  So the default is
# the full cache; BULKHEAD_TCG_TB_SIZE_RESTORED_MIB=16 trades that speed for memory
# on a host short of it (netvms and GUI qubes keep the full cache even then).
TCG_TB_SIZE_RESTORED_MIB = int(os.environ.get("BULKHEAD_TCG_TB_SIZE_RESTORED_MIB",
                                              str(TCG_TB_SIZE_MIB)))


def tcg_tb_size_mib(spec: MachineSpec) -> int:
    """The translation cache a TCG machine gets (see the two constants above)."""
    if spec.extra.get("boot_state") == "restore" and not (
            spec.extra.get("netvm") == "1" or spec.extra.get("gui") == "1"):
        return TCG_TB_SIZE_RESTORED_MIB
    return TCG_TB_SIZE_MIB


def kernel_cmdline(spec: MachineSpec, accel: Accel) -> str:
    """The kernel command line for a direct-boot (pvh) qube."""
    parts = [
        # reboot=panic_warm: a panic leaves its mark for dom0 (see the module doc).
        "console=ttyS0", "panic=-1", "quiet", "reboot=t,panic_warm",
        # Under TCG the guest cannot calibrate its TSC against the emulated PIT reliably.
        f"tsc_early_khz={host_tsc_khz()}", "tsc=reliable", "no_timer_check",
        # The qube kernel has no use for these; each costs boot time.
        "pty.legacy_count=0", "max_loop=0", "8250.nr_uarts=1",
        # The kernel has CONFIG_DUMMY (netvms' tests); no qube wants its default dummy0.
        "dummy.numdummies=0",
        # QEMU's virtio-mmio offers each queue at 1024 entries (its PCI devices: 128-256);
        # our kernel takes at most 256 (kernel/virtio-mmio-queue-max.patch): the
        # virtio-serial ports' pre-posted pages alone were 12 MiB of every qube.
        "virtio_mmio.queue_max=256",
        "root=/dev/vda", "rw", "rootfstype=ext4", "init=/usr/lib/bulkhead/init",
    ]
    if spec.extra.get("boot_state") in ("save", "restore"):
        # A boot whose state is saved, and every restore of it, has one command line
        # naming no qube: the qube's name and volumes come after the restore.
        parts.append("bulkhead.saved=1")
    else:
        parts.append(f"bulkhead.name={spec.name}")
    if spec.vcpus > 1:
        # Bringing up the other vCPUs costs ~0.2-0.5 s of boot under TCG; the
        # guest agent onlines them once it has said HELLO, off the path
        # to agent-ready.
        parts.append("maxcpus=1")
    if spec.extra.get("resize_private") == "1" and "boot_state" not in spec.extra:
        parts.append("bulkhead.resize_private=1")
    # --- GUI (issue 10): the qube starts its GUI agent at boot only if it wants one.
    if spec.extra.get("gui") == "1":
        parts.append("bulkhead.gui=1")
    if spec.kernelopts:
        parts.append(spec.kernelopts)
    return " ".join(parts)


def _opt(path: Path | str) -> str:
    """A path inside QEMU's ``key=value,...`` options: commas are doubled."""
    return str(path).replace(",", ",,")


def is_direct_boot(spec: MachineSpec) -> bool:
    return spec.kernel is not None and spec.virt_mode in ("pvh", "pv")


def build_argv(spec: MachineSpec, accel: Accel, run_dir: Path,
               fds: dict[str, int] | None = None) -> list[str]:
    """QEMU's command line for ``spec``.  Every value here comes from dom0, never from a qube.

    ``fds``: the listening sockets (``qmp``, ``qrexec``, ``console``) QEMU inherits;
    without them QEMU makes the sockets itself in ``run_dir``.
    """
    direct_boot = spec.kernel is not None and spec.virt_mode in ("pvh", "pv")
    argv = [QEMU, "-name", f"guest={spec.name},debug-threads=on"]
    if accel.name == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={tcg_tb_size_mib(spec)}"]
    if direct_boot:
        # microvm: no PCI, no ACPI, no firmware; half the boot time of a PC under TCG.
        argv += ["-M", "microvm,pit=on,pic=on,rtc=on,acpi=off"]
        bus = "device"
    else:
        argv += ["-M", "q35"]
        bus = "pci"
    argv += [
        "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        # Stop rather than exit when the guest goes: dom0 reads why, then quits it.
        "-action", "shutdown=pause",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    if direct_boot:
        argv += ["-kernel", str(spec.kernel), "-append", kernel_cmdline(spec, accel)]
        if spec.initrd:
            argv += ["-initrd", str(spec.initrd)]
    for disk in spec.disks:
        # werror=enospc: a write that finds the host's disk full pauses the machine
        # (the write is retried on `cont`) instead of failing in the guest's filesystem.
        opts = (f"file={_opt(disk.path)},if=none,id={disk.name},format={disk.fmt},"
                "discard=unmap,werror=enospc")
        if disk.readonly:
            opts += ",readonly=on"
        argv += ["-drive", opts,
                 "-device", f"virtio-blk-{bus},drive={disk.name},serial={disk.name}"]
    # --- networking: one virtio-net per link, on descriptors dom0 made (bulkhead.network) ---
    for nic in spec.nics:
        if nic.kind in ("tap", "link"):
            netdev = f"tap,id={nic.name},fd={nic.fd},vhost=off"
        elif nic.kind == "stream":
            netdev = f"stream,id={nic.name},addr.type=fd,addr.str={nic.fd}"
        else:
            raise ValueError(f"unknown network device kind {nic.kind!r}")
        argv += ["-netdev", netdev, "-device", f"virtio-net-{bus},netdev={nic.name},mac={nic.mac}"]
    # --- end networking ---

    def chardev(name: str) -> str:
        where = f"fd={fds[name]}" if fds else f"path={_opt(run_dir / f'{name}.sock')}"
        return f"socket,id={name},{where},server=on,wait=off"

    argv += [
        # Three ports (0, reserved for a console, and ours): the default 31 would
        # give the guest 64 queues to set up.
        "-device", f"virtio-serial-{bus},max_ports=3",
        "-chardev", chardev("qrexec"),
        "-device", f"virtserialport,chardev=qrexec,name={AGENT_PORT}",
        # The GUI's own port on the same virtio-serial device (no extra transport).
        "-chardev", chardev("gui"),
        "-device", f"virtserialport,chardev=gui,name={GUI_PORT}",
        # Without a hardware RNG, Python in the guest blocks seconds on the entropy pool.
        "-device", f"virtio-rng-{bus}",
        # Free page reporting: the guest hands back what it freed, so an idle qube's
        # QEMU shrinks on the host.  (Never KSM: pages shared across qubes leak.)
        "-device", f"virtio-balloon-{bus},free-page-reporting=on",
        "-chardev", chardev("console"),
        "-serial", "chardev:console",
        "-chardev", chardev("qmp"),
        "-mon", "chardev=qmp,mode=control",
        # Jailed, QEMU writes this into a private tmpfs (dom0 writes the host's
        # qemu.pid); the run directory on its command line names its instance.
        "-pidfile", str(run_dir / "qemu.pid"),
    ]
    if spec.extra.get("boot_state") == "restore":
        # Wait, stopped, for the saved state that dom0 hands over QMP (migrate-incoming).
        argv += ["-incoming", "defer"]
    return argv
