#!/usr/bin/env python3
"""Boot and run figures of a qube, against the bare floor measured in the same run.

Prints:
- bare boot: QEMU with the same machine, kernel and acceleration, booting a
  tiny initramfs whose /init prints a line -- the floor nothing of Bulkhead's
  is in;
- cold start: ``admin.vm.Start`` of an AppVM until it returns, i.e. volumes
  prepared, QEMU launched, kernel booted, init run and the guest agent's HELLO
  (the qube has the feature ``boot-state=0``);
- their ratio;
- restored start: the same for an AppVM of the same shape started from its
  saved boot state (bulkhead/bootstate.py), until its own part of the boot is
  done (private volume mounted, name set), against cold and bare;
- the cold start again on a second instance whose daemon runs QEMU unjailed
  (``BULKHEAD_JAIL=0``): the jail's cost (goal <= 1.10 x unjailed);
- the median round trip of running ``true`` in the running qube through the
  Admin API (``bulkhead.vm.Run``), and of the ``qvm-run`` command as a whole;
- QEMU's memory beyond the guest's RAM: RSS, and PSS (libraries shared by all
  qubes' QEMUs counted once per machine rather than once per process).

Goals (TCG on the 2-core CI machine): cold start <= 2.5 s and <= 1.5 x bare;
a start from a saved boot state <= 0.6 s;
round trip <= 50 ms; RSS overhead <= 15 MiB.  Bare and qube runs alternate, so
a change of load during the run hits both.

Usage: bench/boot.py [--runs N] [--calls N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchInstance, median_ms, spread  # noqa: E402

from bulkhead.backend.accel import detect, host_tsc_khz  # noqa: E402
from bulkhead.backend.qemu_argv import TCG_TB_SIZE_MIB  # noqa: E402
from bulkhead.setup import initramfs  # noqa: E402

QUBE = "bench-vm"
RESTORED = "bench-restored"
MEMORY_MIB = 400


def bare_boot(kernel: Path, initrd: Path, accel: str) -> float:
    argv = ["qemu-system-x86_64"]
    argv += ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
    argv += ["-M", "microvm,pit=on,pic=on,rtc=on,acpi=off", "-m", str(MEMORY_MIB), "-smp", "2",
             "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
             "-kernel", str(kernel), "-initrd", str(initrd),
             # The same kernel options a qube boots with (maxcpus=1 included), less its root.
             "-append", f"console=ttyS0 panic=-1 quiet reboot=t tsc_early_khz={host_tsc_khz()} "
                        "tsc=reliable no_timer_check pty.legacy_count=0 max_loop=0 8250.nr_uarts=1 "
                        "maxcpus=1",
             "-device", "virtio-rng-device", "-serial", "stdio"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    took = None
    for line in proc.stdout:
        if initramfs.MARKER.encode() in line:
            took = time.monotonic() - start
            break
    proc.kill()
    proc.wait()
    if took is None:
        sys.exit("the bare kernel did not print its marker")
    return took


TIMELINE = ("read -r _ s e < /run/bulkhead/boot-times; "
            "a=$(cut -d' ' -f22 /proc/$(pgrep -o -f qrexec-agen[t])/stat); "
            "r=$(stat -c %.3Y /run/bulkhead/agent-ready); n=$(date +%s.%N); "
            "read -r up _ < /proc/uptime; echo $s $e $a $r $n $up")


def guest_timeline(vm) -> tuple[float, float, float, float]:
    """When init began and ended, when the agent started and said HELLO, in guest uptime."""
    out = vm.run(TIMELINE, user="root").stdout.split()
    start, end, agent_ticks, ready, now, up = (float(x) for x in out)
    return start, end, agent_ticks / 100, up - (now - ready)


def memory_overhead(pid: int, guest_mib: int) -> tuple[float, float, float]:
    """(RSS, RSS of guest RAM, PSS beyond guest RAM) in MiB, from /proc/PID/smaps."""
    rss_total = pss_total = guest_rss = guest_pss = 0
    size = rss = pss = 0
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
    in_guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if header.match(line):
                in_guest = False
            elif line.startswith("Size:"):
                size = int(line.split()[1])
                in_guest = size == guest_mib * 1024   # the guest's RAM: one mapping of its size
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                rss_total += rss
                if in_guest:
                    guest_rss += rss
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
                pss_total += pss
                if in_guest:
                    guest_pss += pss
    return rss_total / 1024, guest_rss / 1024, (pss_total - guest_pss) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()

    inst = BenchInstance("boot")
    bare_inst = BenchInstance("boot-unjailed", env={"BULKHEAD_JAIL": "0"})
    try:
        app = inst.app()
        kernel_version = app.default_kernel
        kernel = inst.paths.vm_kernel_image(str(kernel_version))
        accel = detect(kernel, inst.paths.cache)
        initrd = initramfs.build(inst.home / "bench-initrd.cpio")
        inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=",
                  "--prop", f"memory={MEMORY_MIB}", QUBE)
        vm = app.domains[QUBE]
        inst.tool("qvm-features", QUBE, "boot-state", "0")
        inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=",
                  "--prop", f"memory={MEMORY_MIB}", RESTORED)
        rvm = inst.app().domains[RESTORED]
        bare_inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=",
                       "--prop", f"memory={MEMORY_MIB}", QUBE)
        bare_inst.tool("qvm-features", QUBE, "boot-state", "0")
        unjailed_vm = bare_inst.app().domains[QUBE]
        for v in (vm, unjailed_vm, rvm):
            v.start()        # first start formats the private volume: not a cold start
            v.shutdown(wait=True)
        inst.tool("bulkhead", "boot-state", RESTORED, "--build")

        bare, cold, unjailed, phases, restored = [], [], [], [], []
        for _ in range(args.runs):
            bare.append(bare_boot(kernel, initrd, accel.name))
            t = time.monotonic()
            vm.start()
            cold.append(time.monotonic() - t)
            phases.append(guest_timeline(vm))
            vm.shutdown(wait=True)   # clean: a kill would leave the next boot a journal to replay
            t = time.monotonic()
            unjailed_vm.start()
            unjailed.append(time.monotonic() - t)
            unjailed_vm.shutdown(wait=True)
            t = time.monotonic()
            rvm.start()
            restored.append(time.monotonic() - t)
            if b"bulkhead.saved=1" not in rvm.run("cat /proc/cmdline").stdout:
                sys.exit(f"{RESTORED} was not started from its saved boot state")
            rvm.shutdown(wait=True)

        vm.start()
        for _ in range(5):
            vm.run("true")                                   # warm up: spare shells, caches
        time.sleep(1)
        rts = []
        for _ in range(args.calls):
            t = time.monotonic()
            vm.run("true")
            rts.append(time.monotonic() - t)
        cli = []
        for _ in range(10):
            t = time.monotonic()
            inst.tool("qvm-run", "-p", QUBE, "true")
            cli.append(time.monotonic() - t)
        pid = int((inst.paths.qube_run_dir(QUBE) / "qemu.pid").read_text())
        rss, guest_rss, pss_over = memory_overhead(pid, MEMORY_MIB)
        vm.kill()

        b, c = median_ms(bare), median_ms(cold)
        print(f"acceleration: {accel.describe()}; guest RAM {MEMORY_MIB} MiB, 2 vCPUs, "
              f"{args.runs} boots each, alternating")
        print(f"bare kernel+initramfs boot:        {spread(bare)}")
        print(f"qube cold start to agent-ready:    {spread(cold)}   (goal <= 2500 ms)")
        print(f"ratio cold start / bare boot:      {c / b:.2f}   (goal <= 1.50)")
        print(f"cold start, QEMU unjailed:         {spread(unjailed)}")
        print(f"ratio jailed / unjailed:           {c / median_ms(unjailed):.2f}   (goal <= 1.10)")
        r = median_ms(restored)
        print(f"start from a saved boot state:     {spread(restored)}   (goal <= 600 ms)")
        print(f"ratio restored / cold start:       {r / c:.2f}; restored / bare boot {r / b:.2f}")
        names = ["init starts", "init done", "agent starts", "agent ready"]
        med = [statistics.median(p[i] for p in phases) for i in range(4)]
        print("  guest timeline (median, s since the kernel started): " +
              ", ".join(f"{n} {m:.2f}" for n, m in zip(names, med)))
        print(f"run round trip (Admin API, true):  median {median_ms(rts):.1f} ms over "
              f"{len(rts)} calls   (goal <= 50 ms)")
        print(f"qvm-run command, whole:            median {median_ms(cli):.0f} ms "
              f"(Python start-up of the tool included)")
        print(f"QEMU RSS {rss:.0f} MiB, of which guest RAM {guest_rss:.0f} MiB: "
              f"overhead RSS {rss - guest_rss:.1f} MiB   (goal <= 15 MiB); "
              f"PSS overhead {pss_over:.1f} MiB")
        return 0
    finally:
        inst.close()
        bare_inst.close()


if __name__ == "__main__":
    sys.exit(main())
