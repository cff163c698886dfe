#!/usr/bin/env python3
"""Disposables: ``qvm-run --dispvm --pass-io 'echo hi'``, cold, restored and preloaded.

Prints the median wall time over N runs of each path, in one run, and the
ratios between them; the floor beside them is ``qvm-run -p work 'echo hi'``
into a running qube (what is left when no qube has to start).  Cold: the
disposable template has the feature ``boot-state=0`` (its disposables boot);
restored: from the saved boot state (bulkhead/bootstate.py), built before the
runs; preloaded: ``preload-dispvm-max=1`` (the preloads are restored too).
Goal: the fastest path <= 0.5 s.  Before each preloaded run the bench waits
until a preload is ready, so it measures taking one, not making one.

Usage: bench/disposable.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchInstance, spread  # noqa: E402


def timed(inst: BenchInstance, *argv: str) -> float:
    t = time.monotonic()
    r = subprocess.run(list(argv), env=inst.env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t
    if r.returncode != 0 or r.stdout != "hi\n":
        sys.exit(f"{' '.join(argv)}: {r.returncode} {r.stdout!r} {r.stderr}")
    return took


def preload_ready(inst: BenchInstance) -> bool:
    names = subprocess.run(["qvm-features", "default-dvm", "preload-dispvm"], env=inst.env,
                           capture_output=True, text=True).stdout.split()
    return bool(names) and bool(subprocess.run(
        ["qvm-features", names[0], "preload-dispvm-completed"], env=inst.env,
        capture_output=True, text=True).stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    inst = BenchInstance("disposable", default_qubes=True)
    try:
        inst.tool("qvm-start", "work")
        dispvm = ["qvm-run", "--dispvm", "--pass-io", "echo hi"]
        floor = [timed(inst, "qvm-run", "-p", "work", "echo hi") for _ in range(args.runs)]
        inst.tool("qvm-features", "default-dvm", "boot-state", "0")
        cold = [timed(inst, *dispvm) for _ in range(args.runs)]
        inst.tool("qvm-features", "--unset", "default-dvm", "boot-state")
        inst.tool("bulkhead", "boot-state", "default-dvm", "--build")
        restored = [timed(inst, *dispvm) for _ in range(args.runs)]
        inst.tool("qvm-features", "default-dvm", "preload-dispvm-max", "1")
        preloaded = []
        for _ in range(args.runs):
            deadline = time.monotonic() + 180
            while not preload_ready(inst):
                if time.monotonic() > deadline:
                    sys.exit("no preload became ready in 180 s")
                time.sleep(0.2)
            preloaded.append(timed(inst, *dispvm))
        inst.tool("qvm-features", "--unset", "default-dvm", "preload-dispvm-max")
        c, r, p = (statistics.median(x) for x in (cold, restored, preloaded))
        best = min(c, r, p)
        print(f"floor: qvm-run -p work 'echo hi' (running qube): {spread(floor)}")
        print(f"qvm-run --dispvm --pass-io 'echo hi', cold: {spread(cold)}")
        print(f"qvm-run --dispvm --pass-io 'echo hi', restored: {spread(restored)}")
        print(f"qvm-run --dispvm --pass-io 'echo hi', preloaded: {spread(preloaded)}")
        print(f"ratios (medians): cold / restored {c / r:.1f}, cold / preloaded {c / p:.1f}, "
              f"restored / preloaded {r / p:.1f}")
        print(f"fastest path median {best * 1000:.0f} ms "
              f"(goal <= 500 ms: {'met' if best <= 0.5 else 'NOT met'})")
        return 0
    finally:
        inst.close()


if __name__ == "__main__":
    sys.exit(main())
