"""qvm-check: does a qube exist (and is it running, paused, a template, networked)?

Exit codes, as in Qubes: 0 if every named qube exists and passes every check,
1 if none passes (or one does not exist), 3 if only some pass.  Unless
``-q``, each passing qube is reported on stderr (``qvm-check: work: exists``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..client import App, VM
from ..client.toolparser import QubesArgumentParser, run_tool

CHECKS: dict[str, tuple[str, Callable[[VM], bool]]] = {
    "running": ("running", lambda vm: vm.is_running()),
    "paused": ("paused", lambda vm: vm.is_paused()),
    "template": ("template", lambda vm: vm.klass == "TemplateVM"),
    "networked": ("networked", lambda vm: vm.is_networked()),
}


class _CheckParser(QubesArgumentParser):
    """Unknown qubes are an answer (exit 1), not a usage error: collect them in ``missing``."""

    missing: list[str] = []

    def lookup(self, app: App, names: Sequence[str]) -> list[VM]:
        found: list[VM] = []
        self.missing = []
        for name in names:
            if name in app.domains or any(c in name for c in "*?["):
                found.extend(vm for vm in super().lookup(app, [name]) if vm not in found)
            else:
                self.missing.append(name)
        return found


def get_parser() -> _CheckParser:
    parser = _CheckParser(vmname_nargs="+", prog="qvm-check",
                          description="exit successfully if the given qubes exist")
    parser.add_argument("--running", action="store_true", help="determine if (any of) the qubes are running")
    parser.add_argument("--paused", action="store_true", help="determine if (any of) the qubes are paused")
    parser.add_argument("--template", action="store_true", help="determine if (any of) the qubes are templates")
    parser.add_argument("--networked", action="store_true",
                        help="determine if (any of) the qubes can reach a network")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        domains: list[VM] = ns.domains
        checks = [CHECKS[name] for name in CHECKS if getattr(ns, name)]
        passing = [vm for vm in domains if all(check(vm) for _, check in checks)]
        status = ", ".join(label for label, _ in checks) or "exists"
        code = 0
        if checks and len(passing) != len(domains):
            code = 3 if passing else 1
        if not domains:
            code = 1
        if checks and not passing:
            parser.log(ns, f"None of qubes: {status}")
        for vm in sorted(passing):
            parser.log(ns, f"{vm.name}: {status}")
        for name in sorted(parser.missing):
            parser.log(ns, f"{name}: non-existent!")
            code = 1
        return code

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
