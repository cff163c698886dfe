"""qvm-pause: freeze qubes in memory (they stop running until qvm-unpause)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, apply_each, run_tool


def get_parser() -> QubesArgumentParser:
    return QubesArgumentParser(vmname_nargs="+", prog="qvm-pause", description="pause a qube",
                               epilog="Paused qubes will be killed on system shutdown.")


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        return apply_each(parser, ns.domains, lambda vm: vm.pause())

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
