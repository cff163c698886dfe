"""qvm-run: run a command in qubes (starting them if needed).

::

    qvm-run work 'ls -l ~'                 # a shell command; its output is discarded
    qvm-run -p work 'cat /etc/hostname'    # --pass-io: stdin/stdout/stderr relayed
    qvm-run -p work -- ls -a /             # COMMAND ARGS: run without a shell
    qvm-run --all --exclude vault 'sync'
    qvm-run -p --service work qubes.Filecopy+arg
    qvm-run -p --dispvm default-dvm 'ping -c1 example.com'

The command runs through the daemon's ``bulkhead.vm.Run`` stream
(:mod:`bulkhead.client.run`).  As in Qubes 4, qvm-run waits for the command
to end and exits with its exit code (the highest one with several qubes);
without ``--pass-io`` its input is empty and its output discarded.

Output from a qube is hostile: when it goes to a terminal (or with
``--filter-escape-chars``) control characters are replaced by ``_``, so a
qube cannot drive the terminal, and it is coloured (red by default) so it
cannot pass for dom0's own.
"""

from __future__ import annotations

import argparse
import codecs
import shlex
import sys
from typing import BinaryIO, Callable, Sequence

from .. import errors
from ..client import App, RunError, VM
from ..client.toolparser import QubesArgumentParser, run_tool

#: control characters a terminal may receive from a qube (all others become "_")
_ALLOWED_CONTROLS = frozenset("\t\n\r\b\a")


class EscapeFilter:
    """Replace every character that could drive a terminal with ``_``, UTF-8 aware.

    Output arrives in arbitrary chunks, so a multi-byte character split
    between two chunks is held until it is complete.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        safe = "".join(c if c.isprintable() or c in _ALLOWED_CONTROLS else "_" for c in text)
        if safe:
            self._write(safe.encode("utf-8"))


def _binary(stream: object) -> BinaryIO:
    return getattr(stream, "buffer", stream)  # type: ignore[return-value]


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _sink(stream: object, filter_esc: bool) -> Callable[[bytes], None]:
    out = _binary(stream)

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()
    return EscapeFilter(write) if filter_esc else write


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(prog="qvm-run", description="run a command in a qube")
    parser.add_argument("--user", "-u", metavar="USER",
                        help="run the command as USER (default: the qube's default_user)")
    parser.add_argument("--autostart", "--auto", "-a", action="store_true", default=True,
                        help="ignored: starting the qube is the default")
    parser.add_argument("--no-autostart", "--no-auto", "-n", action="store_false",
                        dest="autostart", help="do not start the qube; fail if it is not running")
    parser.add_argument("--pass-io", "-p", action="store_true", dest="passio",
                        help="pass stdin/stdout/stderr to and from the command")
    parser.add_argument("--localcmd", metavar="COMMAND", help="not supported yet")
    parser.add_argument("--gui", action="store_true", default=True, help="ignored (default)")
    parser.add_argument("--no-gui", "--nogui", action="store_false", dest="gui",
                        help="ignored: commands run without waiting for a GUI session")
    parser.add_argument("--colour-output", "--color-output", metavar="COLOUR",
                        dest="color_output", default=None,
                        help="mark the qube's output with this ANSI colour (e.g. 31 for red)")
    parser.add_argument("--colour-stderr", "--color-stderr", metavar="COLOUR",
                        dest="color_stderr", default=None,
                        help="mark the qube's stderr with this ANSI colour")
    parser.add_argument("--no-colour-output", "--no-color-output", action="store_false",
                        dest="color_output", help="do not colour the output")
    parser.add_argument("--no-colour-stderr", "--no-color-stderr", action="store_false",
                        dest="color_stderr", help="do not colour stderr")
    parser.add_argument("--filter-escape-chars", action="store_true", dest="filter_esc",
                        default=None,
                        help="filter terminal control characters (default if output is a terminal)")
    parser.add_argument("--no-filter-escape-chars", action="store_false", dest="filter_esc",
                        help="do not filter them; DANGEROUS when output is a terminal")
    parser.add_argument("--service", action="store_true",
                        help="run a qrexec service (named by COMMAND, with +ARGUMENT) instead")
    parser.add_argument("--no-shell", action="store_true",
                        help="run COMMAND without a shell (implied when ARGS are given)")
    parser.add_argument("--dispvm", nargs="?", const="", default=None, metavar="BASE_APPVM",
                        help="run in a new disposable made from BASE_APPVM (or the default)")
    parser.add_argument("--all", action="store_true", dest="all_domains",
                        help="run on all qubes (never dom0)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="exclude the qube from --all")
    # VMNAME is absent with --all and --dispvm, so the words are sorted out by hand
    parser.add_argument("words", metavar="[VMNAME] COMMAND [ARGS]", nargs=argparse.REMAINDER,
                        help="the qube, the command (or service) to run, and its arguments "
                             "(with arguments, the command runs without a shell)")
    return parser


def vmexec_argument(argv: Sequence[str]) -> str:
    """Qubes' qubes.VMExec encoding: words joined by ``+``; in each, bytes other than
    letters, digits, ``_`` and ``.`` as ``-XX`` (hexadecimal), ``-`` as ``--``."""
    words = []
    for word in argv:
        out = []
        for byte in word.encode("utf-8", "surrogateescape"):
            ch = chr(byte)
            if ch == "-":
                out.append("--")
            elif ch.isascii() and (ch.isalnum() or ch in "_."):
                out.append(ch)
            else:
                out.append(f"-{byte:02X}")
        words.append("".join(out))
    return "+".join(words)


def _for_vm(ns: argparse.Namespace, vm: VM, command: str) -> tuple[str, bool]:
    """The command (or service) to send ``vm``: ``COMMAND ARGS`` go through
    qubes.VMExec, without a shell, when the qube says it has it (feature ``vmexec``)."""
    if not ns.service and (ns.cmd_args or ns.no_shell):
        try:
            has_vmexec = bool(vm.features.get("vmexec", ""))
        except errors.QubesException:
            has_vmexec = False
        if has_vmexec:
            return "qubes.VMExec+" + vmexec_argument([ns.cmd, *ns.cmd_args]), True
    return command, ns.service


def _command(parser: QubesArgumentParser, ns: argparse.Namespace) -> str:
    if ns.service:
        if ns.cmd_args:
            parser.error("--service takes no arguments after the service name")
        return ns.cmd
    if ns.cmd_args or ns.no_shell:
        return shlex.join([ns.cmd, *ns.cmd_args])  # quoted: no shell interpretation
    return ns.cmd


def _split_words(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    """Set ns.VMNAME, ns.cmd, ns.cmd_args from the positional words."""
    words = list(ns.words)
    if words and words[0] == "--":
        words.pop(0)
    with_qube = not ns.all_domains and ns.dispvm is None
    if ns.dispvm and not words:
        # "--dispvm COMMAND": the optional BASE_APPVM took the command
        words, ns.dispvm = [ns.dispvm], ""
    if with_qube:
        ns.VMNAME = words.pop(0) if words and words[0] != "--" else None
    else:
        ns.VMNAME = None
    if words and words[0] == "--":
        words.pop(0)
    if ns.VMNAME is None and with_qube:
        parser.error("the following arguments are required: VMNAME (or --all or --dispvm)")
    if not words:
        parser.error("the following arguments are required: COMMAND")
    ns.cmd, ns.cmd_args = words[0], words[1:]


def _targets(parser: QubesArgumentParser, ns: argparse.Namespace) -> list[VM]:
    app: App = ns.app
    if ns.all_domains and ns.dispvm is not None:
        parser.error("--all and --dispvm cannot be used together")
    _split_words(parser, ns)
    if ns.exclude and not ns.all_domains:
        parser.error("--exclude can only be used with --all")
    if ns.all_domains:
        excluded = set(ns.exclude)
        return [vm for vm in app.domains if vm.klass != "AdminVM" and vm.name not in excluded]
    if ns.dispvm is not None:
        return []  # created later, once everything else is checked
    return parser.lookup(app, [ns.VMNAME])


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        domains = _targets(parser, ns)
        command = _command(parser, ns)
        if ns.localcmd:
            parser.error_runtime("--localcmd is not supported yet")
        if ns.passio and len(domains) > 1:
            parser.error("--pass-io cannot be used when more than 1 qube is chosen")
        if ns.filter_esc is None:
            ns.filter_esc = _isatty(sys.stdout)
        if ns.color_output is None and ns.filter_esc and _isatty(sys.stdout):
            ns.color_output = "31"
        if ns.color_stderr is None and _isatty(sys.stderr):
            ns.color_stderr = "31"
        if ns.color_output and not ns.filter_esc:
            parser.error("--color-output must be used with --filter-escape-chars")

        disposable = None
        if ns.dispvm is not None:
            name = ns.app.call(ns.dispvm or "dom0", "admin.vm.CreateDisposable").decode("ascii")
            ns.app.domains.clear_cache()
            disposable = ns.app.domains.get_blind(name.strip())
            domains = [disposable]
        try:
            return _run_all(parser, ns, domains, command)
        finally:
            if disposable is not None:
                # a disposable is removed by the daemon once it stops
                try:
                    disposable.kill()
                except errors.QubesException:
                    pass

    return run_tool(parser, args, app, body)


def _run_all(parser: QubesArgumentParser, ns: argparse.Namespace, domains: list[VM],
             command: str) -> int:
    for vm in domains:
        if vm.is_running():
            continue
        if not ns.autostart:
            parser.error_runtime(f"qube {vm.name!r} is not running")
        try:
            vm.start()
        except errors.QubesVMNotHaltedError:
            pass  # started meanwhile by someone else
    verbose = ns.verbosity - (1 if ns.passio else 0)
    if verbose > 0:
        for vm in domains:
            print(f"Running '{command}' on {vm.name}", file=sys.stderr)
    if ns.passio:
        return _run_passio(parser, ns, domains[0], command)
    if len(domains) == 1:
        return _run_quiet(parser, ns, domains[0], command)
    # only here: concurrent.futures (logging, threading...) would slow every qvm-run's start
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(domains))) as pool:
        codes = list(pool.map(lambda vm: _run_quiet(parser, ns, vm, command), domains))
    return max(codes, default=0)


def _run_quiet(parser: QubesArgumentParser, ns: argparse.Namespace, vm: VM, command: str) -> int:
    command, service = _for_vm(ns, vm, command)
    try:
        return vm.run_stream(command, ns.user, stdin=None, service=service)
    except RunError as e:
        print(f"{parser.prog}: error: {vm.name}: {e}", file=sys.stderr)
        return e.exit_code or 1


def _run_passio(parser: QubesArgumentParser, ns: argparse.Namespace, vm: VM, command: str) -> int:
    stdin = sys.stdin
    if stdin is None or getattr(stdin, "closed", False):
        stdin_arg = None
    else:
        stdin_arg = _binary(stdin)
    stdout = _sink(sys.stdout, ns.filter_esc)
    stderr = _sink(sys.stderr, ns.filter_esc)
    colours = [(sys.stdout, ns.color_output), (sys.stderr, ns.color_stderr)]
    for stream, colour in colours:
        if colour:
            stream.write(f"\033[0;{colour}m")
            stream.flush()
    command, service = _for_vm(ns, vm, command)
    try:
        return vm.run_stream(command, ns.user, stdin=stdin_arg, stdout=stdout, stderr=stderr,
                             service=service, forward_signals=True)
    except RunError as e:
        print(f"{parser.prog}: error: {vm.name}: {e}", file=sys.stderr)
        return e.exit_code or 1
    finally:
        for stream, colour in colours:
            if colour:
                stream.write("\033[0m")
                stream.flush()


if __name__ == "__main__":
    sys.exit(main())
