"""qvm-clone: make a new qube that is a copy of an existing one.

The copy is made as Qubes' client makes it (:meth:`bulkhead.client.App.clone_vm`):
``admin.vm.Create`` with the source's template and label, the non-default
properties, tags and features copied, then each persistent volume copied
with ``admin.vm.volume.CloneFrom``/``CloneTo``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs=1, prog="qvm-clone", description="clone a qube")
    parser.add_argument("new_name", metavar="NEWVM", help="name of the new qube")
    parser.add_argument("--class", "-C", dest="cls", default=None,
                        help="class of the new qube (default: the same as the source)")
    parser.add_argument("--pool", "-p", action="append", metavar="VOLUME_NAME=POOL_NAME",
                        help="the pool to use for a volume")
    parser.add_argument("-P", dest="one_pool", metavar="POOL_NAME", default="",
                        help="the pool to use for every volume")
    parser.add_argument("--ignore-errors", action="store_true",
                        help="log errors in copying properties, tags and features, but go on")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        pools: dict[str, str] = {}
        if not ns.one_pool:
            for item in ns.pool or []:
                volume, sep, pool = item.partition("=")
                if not sep or not volume or not pool:
                    parser.error("pool argument must be of form: --pool VOLUME_NAME=POOL_NAME")
                pools[volume] = pool
        try:
            ns.app.clone_vm(ns.domains[0], ns.new_name, new_cls=ns.cls,
                            pool=ns.one_pool or None, pools=pools or None,
                            ignore_errors=ns.ignore_errors)
        except errors.QubesException as e:
            parser.error_runtime(e)
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
