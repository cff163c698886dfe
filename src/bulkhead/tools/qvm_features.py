"""qvm-features: list, get, set or unset a qube's features.

::

    qvm-features work                  # FEATURE  VALUE table
    qvm-features work gui              # one value (exit 1 if unset)
    qvm-features work gui 1            # set
    qvm-features --unset work gui      # unset
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..client import App
from ..client.table import print_table
from ..client.toolparser import QubesArgumentParser, run_tool


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs=1, prog="qvm-features",
                                 description="manage a qube's features")
    parser.add_argument("feature", metavar="FEATURE", nargs="?", help="name of the feature")
    parser.add_argument("value", metavar="VALUE", nargs="?", help="new value of the feature")
    parser.add_argument("--unset", "--default", "--delete", "-D", dest="delete",
                        action="store_true", help="unset the feature")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        features = ns.domains[0].features
        if ns.feature is None:
            if ns.delete:
                parser.error("--unset requires a feature")
            print_table(features.items())
        elif ns.delete:
            if ns.value is not None:
                parser.error("cannot both set and unset a value")
            try:
                del features[ns.feature]
            except KeyError:
                pass  # unsetting an unset feature is fine, as in Qubes
        elif ns.value is None:
            value = features.get(ns.feature)
            if value is None:
                return 1
            print(value)
        else:
            features[ns.feature] = ns.value
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
