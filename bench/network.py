#!/usr/bin/env python3
"""Networking: HTTP throughput through sys-net and sys-firewall, and how fast a firewall
rule bites.

Prints, in one run, against a stand-in internet (a network namespace this
benchmark makes, with a bridge and an HTTP server; sys-net's uplink is
``bridge:`` into it; no packet goes anywhere else):

- the throughput of an HTTP download of N MiB from the internet namespace into
  ``sys-net`` itself (the floor: the uplink alone) and into ``work`` (through
  sys-net, sys-firewall and two relayed links), timed inside the qube, the median
  of a few runs each, and their ratio (goal: >= 0.7);
- the time from running ``qvm-firewall work add --before 0 drop dsthost=SERVER``
  to the first connection refused in ``work`` (goal: <= 1 s), seen by a prober in
  ``work`` that connects every 10 ms and reports the first refusal at once.

Usage: bench/network.py [--mib N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))
from common import BenchInstance  # noqa: E402
from internet import SERVER, make_internet  # noqa: E402

# Timed in the qube: the download of /big, its bytes counted, in MiB/s.
DOWNLOAD = (r"""s=$(date +%s%N); printf 'GET /big HTTP/1.0\r\n\r\n' | busybox nc -w 10 """
            + SERVER + r""" 80 | wc -c > /tmp/n; e=$(date +%s%N); echo $(cat /tmp/n) $((e-s))""")

PROBER = r"""
import socket, sys, time
seen_up = False
while True:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((sys.argv[1], 80))
        if not seen_up:
            print("up", flush=True)
            seen_up = True
    except OSError as e:
        if seen_up:
            print("refused", e, flush=True)
            break
    finally:
        s.close()
    time.sleep(0.01)
"""


def download(bench: BenchInstance, qube: str) -> float:
    r = bench.run(qube, DOWNLOAD)
    size, ns = (int(x) for x in r.stdout.split())
    if size < 1024 * 1024:
        sys.exit(f"{qube}: the download got only {size} bytes")
    return size / 2**20 / (ns / 1e9)


class NetBench(BenchInstance):
    def run(self, qube: str, command: str, user: str = "root") -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "qvm-run"), "-p", "-u", user,
                               qube, command], env=self.env, capture_output=True, text=True,
                              check=True)

    def firewall(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "bulkhead.tools.qvm_firewall", *args],
                       env=self.env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    ns = parser.parse_args()
    root = Path(os.environ.get("BULKHEAD_BENCH_ROOT", "/var/tmp/bulkhead-bench"))
    net = make_internet(root / "internet-www", big_mib=ns.mib)
    bench = NetBench("network", default_qubes=True)
    try:
        for key, value in net.features().items():
            bench.tool("qvm-features", "sys-net", key, value)
        bench.tool("qvm-start", "work")
        for qube in ("sys-net", "work"):
            download(bench, qube)   # warm: page cache, ARP, TCP caches
        floor, through = [], []
        for _ in range(ns.runs):
            floor.append(download(bench, "sys-net"))
            through.append(download(bench, "work"))
        f, t = statistics.median(floor), statistics.median(through)
        print(f"HTTP download of {ns.mib} MiB from the internet namespace, median of {ns.runs}:")
        print(f"  into sys-net (the floor: the uplink alone)   {f:7.1f} MiB/s  "
              f"(runs: {', '.join(f'{x:.1f}' for x in floor)})")
        print(f"  into work (sys-net -> sys-firewall -> work)  {t:7.1f} MiB/s  "
              f"(runs: {', '.join(f'{x:.1f}' for x in through)})")
        print(f"  ratio work / sys-net                          {t / f:7.2f}        (goal >= 0.7)")

        times = []
        for _ in range(3):
            prober = subprocess.Popen(
                [str(Path(sys.executable).parent / "qvm-run"), "-p", "work",
                 f"python3 -c '{PROBER}' {SERVER}"],
                env=bench.env, stdout=subprocess.PIPE, text=True)
            assert prober.stdout is not None
            if prober.stdout.readline().strip() != "up":
                sys.exit("the prober in work never connected")
            t0 = time.monotonic()
            bench.firewall("work", "add", "--before", "0", "drop", f"dsthost={SERVER}")
            line = prober.stdout.readline()
            t1 = time.monotonic()
            prober.wait(10)
            if not line.startswith("refused"):
                sys.exit(f"the prober said {line!r}")
            times.append(t1 - t0)
            bench.firewall("work", "reset")
        print(f"qvm-firewall add -> first refused connection in work: "
              f"{', '.join(f'{x*1000:.0f}' for x in times)} ms "
              f"(median {statistics.median(times)*1000:.0f} ms; goal <= 1000 ms)")
    finally:
        bench.close()
        net.close()


if __name__ == "__main__":
    main()
