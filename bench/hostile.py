#!/usr/bin/env python3
"""What a hostile qube costs the others: ``qvm-run -p work true`` while ``untrusted``
floods dom0 with HELLO frames, against the same round trip just before.

``untrusted`` runs the tests' fake agent (``tests/vm/hostile_guest.py``, root
in the qube, holding the agent's port); dom0 is made to reconnect to it every
second, as any request for it would, so the flood keeps hitting dom0.
Prints both medians and their ratio (goal: <= 3), and what the flood cost
the daemon: resident memory and log bytes.

Usage: bench/hostile.py [--seconds N] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))
from common import BenchInstance, spread  # noqa: E402
from hostile_qube import DaemonMeter, HostileQube  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=30, help="length of the flood")
    ap.add_argument("--runs", type=int, default=15, help="round trips measured before")
    args = ap.parse_args()
    inst = BenchInstance("hostile", default_qubes=True)
    try:
        inst.tool("qvm-start", "work")
        attacker = HostileQube(inst, "untrusted")
        attacker.seize()
        meter = DaemonMeter(inst)
        meter.round_trips("work", 3)                      # warm up
        before = meter.round_trips("work", args.runs)
        rss0, log0 = meter.rss_kib(), meter.log_bytes()
        attacker.do(f"hello-flood {args.seconds}")
        during: list[float] = []
        peak = rss0
        end = time.monotonic() + args.seconds - 2
        while time.monotonic() < end:
            subprocess.run(["qvm-run", "-p", "untrusted", "echo x"], env=inst.env,
                           capture_output=True, timeout=60)
            during += meter.round_trips("work", 3)
            peak = max(peak, meter.rss_kib())
        grown = meter.log_bytes() - log0
        b, d = statistics.median(before), statistics.median(during)
        ratio = d / b
        print(f"qvm-run -p work true, before the flood ({len(before)} runs): {spread(before)}")
        print(f"qvm-run -p work true, while untrusted floods ({len(during)} runs): "
              f"{spread(during)}")
        print(f"ratio during / before (medians): {ratio:.2f}  (goal <= 3: "
              f"{'met' if ratio <= 3 else 'NOT met'})")
        print(f"daemon RSS: {rss0 / 1024:.1f} MiB before, {peak / 1024:.1f} MiB at peak "
              f"(+{(peak - rss0) / 1024:.1f} MiB; bound 16)")
        print(f"daemon log: +{grown} bytes in {args.seconds} s of flood (bound 1 MB a minute)")
        return 0
    finally:
        inst.close()


if __name__ == "__main__":
    sys.exit(main())
