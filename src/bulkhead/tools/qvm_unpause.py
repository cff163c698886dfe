"""qvm-unpause: let paused qubes run again."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, apply_each, run_tool


def get_parser() -> QubesArgumentParser:
    return QubesArgumentParser(vmname_nargs="+", prog="qvm-unpause", description="unpause a qube")


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        return apply_each(parser, ns.domains, lambda vm: vm.unpause())

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
