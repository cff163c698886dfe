#!/usr/bin/env python3
"""Admin API figures with many qubes defined.

Prints the time of ``qvm-ls`` with 200 qubes defined (goal <= 150 ms), both
as the command a user types (Python start-up included) and as the listing
itself inside one process, and the round trip of one
``admin.vm.property.Get``.  The qubes are real definitions with real volumes
in the daemon's store; none is started.

Usage: bench/admin.py [--qubes N]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchInstance, median_ms, spread  # noqa: E402

from bulkhead.client.app import App  # noqa: E402
from bulkhead.client.connection import Connection  # noqa: E402
from bulkhead.tools import qvm_ls  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qubes", type=int, default=200)
    args = ap.parse_args()
    inst = BenchInstance("admin")
    try:
        app = inst.app()
        t = time.monotonic()
        have = len(list(app.domains))
        for i in range(args.qubes - have):
            app.add_new_vm("AppVM", f"q{i:03d}", ["red", "green", "blue", "yellow"][i % 4],
                           template="debian-12")
        created = time.monotonic() - t
        n = len(list(App(Connection(inst.env["BULKHEAD_SOCKET"])).domains))

        cli = []
        for _ in range(10):
            t = time.monotonic()
            inst.tool("qvm-ls")
            cli.append(time.monotonic() - t)
        inproc = []
        for _ in range(10):
            buf = io.StringIO()
            t = time.monotonic()
            with redirect_stdout(buf):
                qvm_ls.main([], app=App(Connection(inst.env["BULKHEAD_SOCKET"])))
            inproc.append(time.monotonic() - t)
        lines = buf.getvalue().count("\n")
        gets = []
        conn = Connection(inst.env["BULKHEAD_SOCKET"])
        for _ in range(200):
            t = time.monotonic()
            reply = conn.request("q100", "admin.vm.property.Get", "netvm")
            gets.append(time.monotonic() - t)
        assert reply.startswith(b"0\0"), reply

        print(f"{n} qubes defined (created {args.qubes - have} in {created:.1f} s)")
        print(f"qvm-ls, the command:               {spread(cli)}   (goal <= 150 ms)")
        print(f"qvm-ls, in one process:            {spread(inproc)}  ({lines} lines)")
        print(f"admin.vm.property.Get round trip:  median {median_ms(gets):.2f} ms over {len(gets)}")
        return 0
    finally:
        inst.close()


if __name__ == "__main__":
    sys.exit(main())
