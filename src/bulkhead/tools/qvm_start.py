"""qvm-start: start qubes."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, apply_each, run_tool


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs="+", prog="qvm-start", description="start a qube")
    parser.add_argument("--skip-if-running", action="store_true", default=False,
                        help="do not fail if the qube is already running")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        to_start = []
        for vm in ns.domains:
            if vm.is_running():
                if ns.skip_if_running:
                    continue
                parser.error_runtime(f"domain {vm.name} is already running")
            to_start.append(vm)
        return apply_each(parser, to_start, lambda vm: vm.start())

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
