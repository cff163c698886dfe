#!/usr/bin/env python3
"""Host memory of idle qubes: what each costs the host once it has settled.

Starts N AppVMs (default 10, no network, the default 400 MiB), waits until they
have settled (booted, their agents idle, what the guests freed reported back
through the balloon's free page reporting), then prints, from each QEMU's
/proc/PID/smaps:

- the sum of the QEMUs' PSS (libraries shared by all QEMUs counted once in all)
  and the per-qube mean, min and max -- the figure qvm-ls's MEM column shows;
- of each qube's PSS: its guest RAM still resident, the TCG translation cache
  (QEMU's code buffer, ``tb-size``: KVM would not have it), and the rest (QEMU's
  heap, stacks, libraries' share);
- the baseline, measured in the same run: one QEMU with the same machine,
  memory and kernel booting only a tiny initramfs (no Debian, no agent), idle;
- memory given back: one qube allocates 200 MiB and frees it; its QEMU's RSS
  before, at the peak, and how long until most of it (150 MiB) is back.

The qubes start as they do by default, from their saved boot state
(bulkhead/bootstate.py, built before the starts); ``--cold`` gives them the
feature ``boot-state=0`` so that they boot.

Goal (TCG): <= 90 MiB per idle qube, so that 20 idle qubes fit in under 2 GiB.

Usage: bench/memory.py [--qubes N] [--settle S] [--cold]
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
from common import BenchInstance  # noqa: E402

from bulkhead.backend.accel import detect, host_tsc_khz  # noqa: E402
from bulkhead.backend.qemu_argv import TCG_TB_SIZE_MIB, TCG_TB_SIZE_RESTORED_MIB  # noqa: E402
from bulkhead.setup import initramfs  # noqa: E402

MEMORY_MIB = 400
HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def breakdown(pid: int, guest_mib: int) -> dict[str, float]:
    """PSS in MiB: total, guest RAM, TCG code buffer, the rest (from /proc/PID/smaps)."""
    out = {"pss": 0.0, "guest": 0.0, "tcg": 0.0, "rss": 0.0}
    kind = "rest"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if HEADER.match(line):
                kind = "rest"
                # The translation cache: QEMU's only anonymous writable+executable
                # memory, cut into regions by guard pages.
                if line.split()[1] == "rwxp" and len(line.split()) == 5:
                    kind = "tcg"
            elif line.startswith("Size:"):
                if int(line.split()[1]) == guest_mib * 1024:
                    kind = "guest"          # the guest's RAM: one mapping of its size
            elif line.startswith("Rss:"):
                out["rss"] += int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
                out["pss"] += pss
                if kind in ("guest", "tcg"):
                    out[kind] += pss
    out["rest"] = out["pss"] - out["guest"] - out["tcg"]
    return out


def bare_qemu(kernel: Path, initrd: Path, accel: str) -> subprocess.Popen:
    """The baseline: the same QEMU machine booting a tiny initramfs that then idles."""
    argv = ["qemu-system-x86_64"]
    argv += ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
    argv += ["-M", "microvm,pit=on,pic=on,rtc=on,acpi=off", "-m", str(MEMORY_MIB),
             "-nodefaults", "-no-user-config", "-nographic",
             "-kernel", str(kernel), "-initrd", str(initrd),
             "-append", f"console=ttyS0 panic=-1 quiet tsc_early_khz={host_tsc_khz()} "
                        "tsc=reliable no_timer_check pty.legacy_count=0 max_loop=0 "
                        "8250.nr_uarts=1",
             "-device", "virtio-rng-device",
             "-device", "virtio-balloon-device,free-page-reporting=on", "-serial", "null"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def give_back(inst: BenchInstance, qube: str) -> tuple[float, float, float, float | None]:
    """(RSS before, at the peak, after) in MiB, and seconds until 150 MiB came back."""
    pid = int((inst.paths.qube_run_dir(qube) / "qemu.pid").read_text())
    before = rss_mib(pid)
    hold = subprocess.Popen(
        [str(Path(sys.executable).parent / "qvm-run"), "-p", qube,
         "python3 -c \"import sys; b = b'x' * (200 << 20); print('held', flush=True); "
         "sys.stdin.read()\""],
        env=inst.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hold.stdin is not None and hold.stdout is not None
    hold.stdout.readline()
    peak = rss_mib(pid)
    hold.stdin.close()
    hold.wait()
    freed = time.monotonic()
    after, took = peak, None
    while time.monotonic() - freed < 30:
        after = rss_mib(pid)
        if after <= peak - 150:
            took = time.monotonic() - freed
            break
        time.sleep(0.1)
    return before, peak, after, took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qubes", type=int, default=10)
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds to wait after the last start")
    ap.add_argument("--cold", action="store_true", help="boot the qubes (boot-state=0)")
    args = ap.parse_args()

    inst = BenchInstance("memory")
    bare = None
    try:
        app = inst.app()
        kernel = inst.paths.vm_kernel_image(str(app.default_kernel))
        accel = detect(kernel, inst.paths.cache)
        # The initramfs's /init, made to idle instead of rebooting.
        initramfs.INIT = "#!/bin/busybox sh\n/bin/busybox sleep 100000\n"
        initrd = initramfs.build(inst.home / "idle-initrd.cpio")
        names = [f"idle{i}" for i in range(args.qubes)]
        t0 = time.monotonic()
        for n in names:
            inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=",
                      "--prop", f"memory={MEMORY_MIB}", n)
            if args.cold:
                inst.tool("qvm-features", n, "boot-state", "0")
        if not args.cold:
            inst.tool("bulkhead", "boot-state", names[0], "--build")
        for n in names:
            inst.tool("qvm-start", n)
        bare = bare_qemu(kernel, initrd, accel.name)
        started = time.monotonic() - t0
        time.sleep(args.settle)
        per = {n: breakdown(int((inst.paths.qube_run_dir(n) / "qemu.pid").read_text()),
                            MEMORY_MIB) for n in names}
        base = breakdown(bare.pid, MEMORY_MIB)
        mem_col = {line.split("|")[0]: int(line.split("|")[1]) for line in
                   inst.tool("qvm-ls", "--raw-data", "-O", "name,mem", *names).stdout.split()}

        pss = [p["pss"] for p in per.values()]
        mean = statistics.mean(pss)
        how = "booted cold" if args.cold else "started from their saved boot state"
        tb_max = TCG_TB_SIZE_MIB if args.cold else TCG_TB_SIZE_RESTORED_MIB
        print(f"acceleration: {accel.describe()}; {args.qubes} idle AppVMs of {MEMORY_MIB} MiB, "
              f"{how}, started in {started:.0f} s, measured {args.settle:.0f} s after the "
              "last start")
        print(f"sum of the QEMUs' PSS:             {sum(pss):.0f} MiB")
        print(f"per qube PSS:                      mean {mean:.1f} / min {min(pss):.1f} / "
              f"max {max(pss):.1f} MiB   (goal <= 90 MiB)")
        for what, key in (("guest RAM still resident", "guest"),
                          (f"TCG translation cache ({tb_max} MiB max)", "tcg"),
                          ("QEMU itself (heap, stacks, libraries)", "rest")):
            print(f"  of which {what + ':':44} mean "
                  f"{statistics.mean(p[key] for p in per.values()):.1f} MiB")
        print(f"  mean RSS (libraries counted in full): "
              f"{statistics.mean(p['rss'] for p in per.values()):.1f} MiB")
        print(f"qvm-ls MEM column, mean:           {statistics.mean(mem_col.values()):.1f} MiB")
        print(f"baseline, a bare QEMU idling in a tiny initramfs: PSS {base['pss']:.1f} MiB "
              f"(guest {base['guest']:.1f}, TCG {base['tcg']:.1f}, QEMU {base['rest']:.1f}); "
              f"ratio per qube / baseline {mean / base['pss']:.2f}")
        print(f"20 idle qubes would take ~{20 * mean / 1024:.2f} GiB   (goal < 2 GiB)")
        # Idle is not unused: a qube that ran something keeps the translations (the
        # cache fills to its max and stays) and the page cache of what it read.
        inst.tool("qvm-run", "-p", names[-1], "python3 -c 'import json, email, asyncio, "
                  "sqlite3, argparse, decimal; print(sum(i * i for i in range(100000)))'")
        time.sleep(5)
        used = breakdown(int((inst.paths.qube_run_dir(names[-1]) / "qemu.pid").read_text()),
                         MEMORY_MIB)
        print(f"one of them after a Python command, settled 5 s: PSS {used['pss']:.1f} MiB "
              f"(guest {used['guest']:.1f}, TCG {used['tcg']:.1f}, QEMU {used['rest']:.1f})")
        before, peak, after, took = give_back(inst, names[0])
        print(f"200 MiB allocated and freed in a qube: QEMU RSS {before:.0f} MiB before, "
              f"{peak:.0f} at the peak, {after:.0f} after; 150 MiB back "
              + (f"{took:.1f} s after the free   (goal <= 10 s)" if took is not None
                 else "not within 30 s   (goal <= 10 s)"))
        return 0
    finally:
        if bare is not None:
            bare.kill()
            bare.wait()
        inst.close()


if __name__ == "__main__":
    sys.exit(main())
