"""qubes-prefs: list, get, set or reset the global properties (``admin.property.*``).

Same interface as qvm-prefs, without the qube argument::

    qubes-prefs                       # every global property
    qubes-prefs default_netvm         # one value
    qubes-prefs default_netvm sys-firewall
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool
from .qvm_prefs import add_prefs_arguments, process_actions


def get_parser() -> QubesArgumentParser:
    return add_prefs_arguments(QubesArgumentParser(prog="qubes-prefs",
                                                   description="list or change global properties"))


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()
    return run_tool(parser, args, app, lambda ns: process_actions(parser, ns, ns.app))


if __name__ == "__main__":
    sys.exit(main())
