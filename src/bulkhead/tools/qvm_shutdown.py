"""qvm-shutdown: ask qubes to shut down, optionally waiting (and killing after a timeout)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App, VM
from ..client.power import is_halted, wait_until_halted
from ..client.toolparser import QubesArgumentParser, run_tool


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs="+", prog="qvm-shutdown",
                                 description="shut down a qube")
    parser.add_argument("--wait", action="store_true", default=False,
                        help="wait for the qubes to shut down")
    parser.add_argument("--timeout", action="store", type=float, default=60,
                        help="timeout after which qubes are killed when using --wait"
                             " (default: %(default)d)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="force shutdown regardless of connected qubes; use with caution")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        # with --all every qube goes down, so one qube's users need not hold it up
        force = ns.force or ns.all_domains
        if not ns.wait:
            failed = _request(parser, ns.domains, force, report=True)
            return len(failed)
        # A qube still in use as netvm refuses to shut down until its users
        # have: retry those in rounds, after the others have halted.
        remaining: list[VM] = list(ns.domains)
        commit_failures: dict[str, str] = {}
        for _ in range(len(ns.domains)):
            refused = _request(parser, remaining, force, report=False)
            asked = [vm for vm in remaining if vm not in refused]
            remaining = refused
            if not asked:
                break
            for vm in wait_until_halted(ns.app, asked, ns.timeout, commit_failures):
                parser.log(ns, f"{vm.name}: did not shut down in {ns.timeout:g} s, killing it")
                try:
                    vm.kill()
                except errors.QubesVMNotStartedError:
                    pass  # it halted just now
            if not remaining:
                break
        failed = [vm for vm in ns.domains if not is_halted(vm)]
        if commit_failures and not failed:
            # The qubes halted, but what they wrote is not committed: say so, one line each.
            parser.error_runtime("\n".join(commit_failures.values()), len(commit_failures))
        if failed:
            parser.error_runtime("Failed to shut down: " + ", ".join(vm.name for vm in failed),
                                 len(failed))
        return 0

    return run_tool(parser, args, app, body)


def _request(parser: QubesArgumentParser, vms: Sequence[VM], force: bool,
             report: bool) -> list[VM]:
    """Ask each qube to shut down; returns those that refused."""
    refused = []
    for vm in vms:
        try:
            vm.shutdown(force=force)
        except errors.QubesVMNotStartedError:
            pass  # already halted: nothing to do
        except errors.QubesException as e:
            if report:
                print(f"{parser.prog}: error: {vm.name}: {e}", file=sys.stderr)
            refused.append(vm)
    return refused


if __name__ == "__main__":
    sys.exit(main())
