"""qvm-tags: list, query, add or remove a qube's tags.

::

    qvm-tags work                   # list (same as: qvm-tags work list)
    qvm-tags work list TAG          # print TAG if set, else exit 1
    qvm-tags work add TAG [TAG...]  # aliases: a, set
    qvm-tags work del TAG           # aliases: d, unset, u
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool

COMMANDS = {"list": "list", "ls": "list", "l": "list",
            "add": "add", "a": "add", "set": "add",
            "del": "del", "d": "del", "unset": "del", "u": "del"}


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs=1, prog="qvm-tags",
                                 description="manage a qube's tags")
    parser.add_argument("command", metavar="COMMAND", nargs="?", default="list",
                        choices=sorted(COMMANDS),
                        help="list (default), add or del (aliases: ls, l, a, set, d, unset, u)")
    parser.add_argument("tag", metavar="TAG", nargs="*", help="tag names")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        tags = ns.domains[0].tags
        command = COMMANDS[ns.command]
        if command == "list":
            if len(ns.tag) > 1:
                parser.error("list takes at most one TAG")
            if not ns.tag:
                for tag in sorted(tags):
                    print(tag)
                return 0
            if ns.tag[0] not in tags:
                return 1
            print(ns.tag[0])
            return 0
        if not ns.tag:
            parser.error(f"{ns.command} requires a TAG")
        for tag in ns.tag:
            if command == "add":
                tags.add(tag)
            else:
                tags.discard(tag)
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
