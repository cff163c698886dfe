"""qvm-pool: list the storage pools and show one.

::

    qvm-pool [list]            # NAME  DRIVER
    qvm-pool info POOL         # name, driver, then the pool's settings
    qvm-pool drivers           # DRIVER  OPTIONS
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.table import print_table
from ..client.toolparser import QubesArgumentParser, add_subcommands, run_tool


def list_pools(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    pools = ns.app.pools.values()
    print_table([("NAME", "DRIVER")] + [(pool.name, pool.driver) for pool in pools])


def info_pool(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    if ns.pool not in ns.app.pools:
        parser.error_runtime(f"no such pool: {ns.pool!r}")
    pool = ns.app.pools[ns.pool]
    config = dict(pool.config)
    rows = [("name", pool.name), ("driver", config.pop("driver", ""))]
    config.pop("name", None)
    rows += sorted(config.items())
    print_table(rows)


def list_drivers(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    body = ns.app.call("dom0", "admin.pool.ListDrivers").decode("utf-8")
    rows = [("DRIVER", "OPTIONS")]
    for line in body.splitlines():
        if line:
            driver, _, options = line.partition(" ")
            rows.append((driver, ", ".join(options.split())))
    print_table(rows)


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(prog="qvm-pool", description="manage storage pools")
    sub = add_subcommands(parser)
    p = sub.add_parser("list", aliases=["ls", "l"], help="list the pools")
    p.set_defaults(func=list_pools)
    p = sub.add_parser("info", aliases=["i"], help="show a pool's settings")
    p.add_argument("pool", metavar="POOL")
    p.set_defaults(func=info_pool)
    p = sub.add_parser("drivers", aliases=["d"], help="list the pool drivers and their options")
    p.set_defaults(func=list_drivers)
    parser.set_defaults(func=list_pools)
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()
    return run_tool(parser, args, app, lambda ns: ns.func(parser, ns))


if __name__ == "__main__":
    sys.exit(main())
