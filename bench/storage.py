#!/usr/bin/env python3
"""Storage figures: what a commit costs as a qube's data grows, and whether a big
private volume slows a start -- each beside its baseline, measured in the same run.

Prints:
- commit time of a started private volume holding 16 MiB, 1 GiB and 4 GiB of
  new data: the ``file`` pool's commit (the run's overlay becomes the new
  revision), beside the flattening commit it replaced (``qemu-img convert`` of
  the whole volume into a new image, then the same rename) on the same data;
  the data is written into the started copy with ``qemu-io``, as a qube's writes
  would land there;
- start-to-agent-ready (``admin.vm.Start`` until it returns) of a qube whose
  private volume holds 4 GiB of files against one holding nothing, starts
  alternating, and their ratio.

Goals: commit the same within noise whatever the data, <= 100 ms; start ratio
<= 1.1.

Usage: bench/storage.py [--runs N] [--sizes 16M,1G,4G] [--full-gib 4]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchInstance, median_ms, spread  # noqa: E402

from bulkhead.storage import qemu_img  # noqa: E402
from bulkhead.storage.file_pool import FilePool  # noqa: E402
from bulkhead.storage.pool import VolumeConfig  # noqa: E402

MiB = 2**20
GiB = 2**30
EMPTY, FULL = "bench-empty", "bench-full"


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1].upper()]


def write_data(image: Path, size: int) -> None:
    """``size`` bytes of new data in the started copy, in 64 MiB writes of a pattern."""
    step = 64 * MiB
    commands = []
    for offset in range(0, size, step):
        commands += ["-c", f"write -P 0x5a {offset} {min(step, size - offset)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(image)], check=True,
                   capture_output=True)


async def commit_times(root: Path, size: int) -> tuple[float, float]:
    """(chain commit, flattening commit) in seconds for ``size`` bytes of new data."""
    pool = FilePool("bench", root / f"pool-{size}", merge_in_background=False)
    await pool.setup()
    vol = pool.init_volume("appvms/bench/private", VolumeConfig(
        name="private", pool="bench", size=size + GiB, save_on_stop=True, revisions_to_keep=1))
    await vol.create()
    spec = await vol.start()
    write_data(spec.path, size)
    qemu_img.fsync_file(spec.path)      # the data is on disk before the clock starts
    # Baseline: the flattening commit on the very same started copy (to a side file).
    flat = vol.dir / "baseline-flat.qcow2"
    t = time.monotonic()
    await qemu_img.flatten(spec.path, flat)
    qemu_img.fsync_file(flat)
    flattening = time.monotonic() - t
    flat.unlink()
    t = time.monotonic()
    await vol._commit()                  # the commit stop() does, without the merge after it
    chain = time.monotonic() - t
    await vol.remove()
    return chain, flattening


def fill_private(inst: BenchInstance, qube: str, gib: int) -> None:
    """``gib`` GiB of files in the qube's home (written by the qube), committed."""
    inst.tool("qvm-volume", "resize", f"{qube}:private", f"{gib + 2}GiB")
    inst.tool("qvm-start", qube)
    inst.tool("qvm-run", "-p", qube, f"for i in $(seq {gib}); do "
              "dd if=/dev/zero of=/home/user/big-$i bs=1M count=1024 status=none; done; sync")
    inst.tool("qvm-shutdown", "--wait", qube)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="16M,1G,4G")
    ap.add_argument("--full-gib", type=int, default=4)
    args = ap.parse_args()

    inst = BenchInstance("storage")
    try:
        rows = []
        for text in args.sizes.split(","):
            runs = [asyncio.run(commit_times(inst.home, parse_size(text)))
                    for _ in range(args.runs)]
            rows.append((text, [r[0] for r in runs], [r[1] for r in runs]))

        for qube in (EMPTY, FULL):
            inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=", qube)
        app = inst.app()
        for qube in (EMPTY, FULL):       # first starts format the private volumes
            app.domains[qube].start()
            app.domains[qube].shutdown(wait=True)
        fill_private(inst, FULL, args.full_gib)
        starts: dict[str, list[float]] = {EMPTY: [], FULL: []}
        for _ in range(args.runs):
            for qube in (EMPTY, FULL):
                vm = app.domains[qube]
                t = time.monotonic()
                vm.start()
                starts[qube].append(time.monotonic() - t)
                vm.shutdown(wait=True)

        print(f"commit of a started private volume, {args.runs} runs each "
              "(chain: the file pool now; flatten: the commit it replaced, same data)")
        for text, chain, flat in rows:
            print(f"  {text:>4} new data: chain {spread(chain)}   flatten {spread(flat)}"
                  f"   ({median_ms(flat) / max(median_ms(chain), 0.001):.0f}x)")
        spread_all = [median_ms(c) for _, c, _ in rows]
        print(f"  chain commit medians {', '.join(f'{m:.1f}' for m in spread_all)} ms   "
              "(goal: the same within noise, <= 100 ms)")
        e, f = median_ms(starts[EMPTY]), median_ms(starts[FULL])
        print(f"start to agent-ready, private empty:          {spread(starts[EMPTY])}")
        print(f"start to agent-ready, private with {args.full_gib} GiB:     {spread(starts[FULL])}")
        print(f"ratio {args.full_gib} GiB / empty:                       {f / e:.2f}   (goal <= 1.10); "
              f"of the fastest starts {min(starts[FULL]) / min(starts[EMPTY]):.2f}")
        usage = app.domains[FULL].volumes["private"].usage
        print(f"  (the {args.full_gib} GiB qube's private uses {usage / GiB:.2f} GiB on the host)")
        return 0
    finally:
        inst.close()


if __name__ == "__main__":
    sys.exit(main())
