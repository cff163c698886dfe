"""What every qvm-* tool shares: argument parsing, qube selection, error reporting.

- :class:`QubesArgumentParser` adds Qubes' common options (``-v``/``-q``),
  and the qube arguments: one name, or several with ``--all``/``--exclude``
  and shell wildcards (``'fedora*'``); it resolves them to VM objects in
  ``args.domains`` (``no such domain: 'x'`` otherwise).
- :func:`run_tool` runs a tool's body and turns every expected failure into
  one line on stderr (``qvm-prefs: error: ...``) and an exit code, never a
  traceback: argparse's exits, the daemon's exceptions, a daemon that is not
  running, Ctrl-C.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from .. import errors
from .app import App
from .connection import Connection
from .vm import VM

_WILDCARDS = "*?["

#: What the daemon may answer instead of doing the work: reported, never a traceback.
#: (PermissionDenied and ProtocolError are not QubesExceptions, as in Qubes.)
DAEMON_ERRORS = (errors.QubesException, errors.PermissionDenied, errors.ProtocolError)


class QubesArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser preconfigured as Qubes' tools are.

    ``vmname_nargs``: None (no qube argument), ``1`` or ``'?'`` (one qube),
    ``'+'`` (one or more, or ``--all``) or ``'*'`` (zero or more, or ``--all``).
    """

    def __init__(self, vmname_nargs: int | str | None = None, *, all_help: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("prog", os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None)
        super().__init__(**kwargs)
        self._vmname_nargs = vmname_nargs
        self.add_argument("--verbose", "-v", action="count", default=1, help="increase verbosity")
        self.add_argument("--quiet", "-q", action="count", default=0, help="decrease verbosity")
        if vmname_nargs in ("+", "*"):
            self.add_argument("--all", action="store_true", dest="all_domains",
                              help=all_help or "perform the action on all qubes")
            self.add_argument("--exclude", action="append", default=[], metavar="EXCLUDE",
                              help="exclude the qube from --all")
            self.add_argument("VMNAME", nargs="*", default=[],
                              help="one or more qube names (shell wildcards allowed)")
        elif vmname_nargs is not None:
            self.add_argument("VMNAME", nargs=vmname_nargs,
                              help="a qube name" if vmname_nargs in (1, "?") else "qube names")

    # --- errors: one line, no usage dump ---------------------------------------
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def error_runtime(self, message: object, exit_code: int = 1) -> NoReturn:
        self.exit(exit_code, f"{self.prog}: error: {message}\n")

    def log(self, args: argparse.Namespace, message: str) -> None:
        """An informational line on stderr (as Qubes' tools log), unless ``-q``."""
        if getattr(args, "verbosity", 1) > 0:
            print(f"{self.prog}: {message}", file=sys.stderr)

    # --- parsing ------------------------------------------------------------------
    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None, *,
                   app: App | None = None) -> argparse.Namespace:
        ns = super().parse_args(args, namespace)
        ns.verbosity = ns.verbose - ns.quiet
        ns.app = app if app is not None else App(Connection())
        if self._vmname_nargs is not None:
            ns.domains = self.resolve_domains(ns)
        return ns

    def resolve_domains(self, ns: argparse.Namespace) -> list[VM]:
        """The VM objects the qube arguments name (checked against ``admin.vm.List``)."""
        app: App = ns.app
        if self._vmname_nargs in ("+", "*"):
            if ns.all_domains:
                if ns.VMNAME:
                    self.error("--all cannot be combined with qube names")
                excluded = set(ns.exclude)
                # --all never includes dom0, as in Qubes
                return [vm for vm in app.domains
                        if vm.klass != "AdminVM" and vm.name not in excluded]
            if ns.exclude:
                self.error("--exclude can only be used with --all")
            if not ns.VMNAME:
                if self._vmname_nargs == "+":
                    self.error("one of the arguments --all VMNAME is required")
                return []
            names = ns.VMNAME
        else:
            value = ns.VMNAME
            names = value if isinstance(value, list) else ([] if value is None else [value])
        return self.lookup(app, names)

    def lookup(self, app: App, names: Sequence[str]) -> list[VM]:
        found: list[VM] = []
        for pattern in names:
            if any(c in pattern for c in _WILDCARDS):
                matches = [vm for vm in app.domains if fnmatch.fnmatchcase(vm.name, pattern)]
            else:
                try:
                    matches = [app.domains[pattern]]
                except KeyError:
                    self.error(f"no such domain: {pattern!r}")
            found.extend(vm for vm in matches if vm not in found)
        return found


class SubcommandParser(argparse.ArgumentParser):
    """The parser of one subcommand (``qvm-volume info``): errors in one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_subcommands(parser: QubesArgumentParser) -> "argparse._SubParsersAction[SubcommandParser]":
    """Subcommands (with aliases) whose parsers report errors like the main one."""
    return parser.add_subparsers(title="commands", dest="command", metavar="COMMAND",
                                 parser_class=SubcommandParser)


def run_tool(parser: QubesArgumentParser, argv: Sequence[str] | None, app: App | None,
             body: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse ``argv``, run ``body(args)``; returns the exit code, reporting errors in one line."""
    try:
        args = parser.parse_args(argv, app=app)
        return int(body(args) or 0)
    except SystemExit as e:  # argparse, --help, error_runtime
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except DAEMON_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (qvm-ls | head): not an error.
        # Point stdout at /dev/null so the flush at exit does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
            pass
        return 0


def apply_each(parser: QubesArgumentParser, domains: Sequence[VM], action: Callable[[VM], object],
               *, ignore: tuple[type[BaseException], ...] = (),
               message: Callable[[VM, Exception], str] = lambda vm, e: f"{vm.name}: {e}") -> int:
    """Run ``action`` on each qube; report each failure on stderr; 1 if any failed, else 0.

    Exceptions in ``ignore`` are not failures (qvm-kill of a halted qube).
    """
    exit_code = 0
    for vm in domains:
        try:
            action(vm)
        except ignore:
            pass
        except (*DAEMON_ERRORS, OSError) as e:
            print(f"{parser.prog}: error: {message(vm, e)}", file=sys.stderr)
            exit_code = 1
    return exit_code
