"""qvm-kill: stop qubes at once, without asking their system to shut down."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App
from ..client.toolparser import QubesArgumentParser, apply_each, run_tool


def get_parser() -> QubesArgumentParser:
    return QubesArgumentParser(vmname_nargs="+", prog="qvm-kill",
                               description="forceful shutdown of a qube")


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        # killing a qube that is not running is not an error, as in Qubes
        return apply_each(parser, ns.domains, lambda vm: vm.kill(),
                          ignore=(errors.QubesVMNotStartedError,),
                          message=lambda vm, e: f"Failed to kill '{vm.name}': {e}")

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
