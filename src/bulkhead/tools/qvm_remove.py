"""qvm-remove: delete qubes, with their volumes (asks first unless ``-f``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs="+", prog="qvm-remove",
                                 description="remove qubes from the system")
    parser.add_argument("--force", "-f", action="store_true", dest="no_confirm",
                        help="do not prompt for confirmation")
    return parser


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:  # no terminal to answer: that is a no
        return ""


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        if any(vm.name == "dom0" for vm in ns.domains):
            parser.error_runtime("Domain 'dom0' cannot be removed.")
        if ns.all_domains and not (ns.no_confirm or ns.exclude):
            print("WARNING!!! Removing all domains may leave your system in an "
                  "unrecoverable state!", file=sys.stderr)
            if _ask("Are you certain? [N/IKNOWWHATIAMDOING] ") != "IKNOWWHATIAMDOING":
                print("Remove cancelled.", file=sys.stderr)
                return 1
        if not ns.no_confirm:
            print("This will completely remove the selected VM(s)...", file=sys.stderr)
            for vm in ns.domains:
                print("  " + vm.name, file=sys.stderr)
            if _ask("Are you sure? [y/N] ").strip().upper() != "Y":
                print("Remove cancelled.", file=sys.stderr)
                return 1
        for vm in ns.domains:
            try:
                del ns.app.domains[vm.name]
            except errors.QubesException as e:
                parser.error_runtime(f"cannot remove {vm.name}: {e}")
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
