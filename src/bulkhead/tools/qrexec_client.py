"""qrexec-client: dom0 runs a command or a qrexec service in a qube, with Qubes' arguments.

::

    qrexec-client -d work user:'ls -l ~'
    qrexec-client -d work 'DEFAULT:QUBESRPC qubes.Filecopy personal' < stream
    qrexec-client -d work -l 'tar c ~/Documents' root:'tar x -C /tmp'
    qrexec-client -d work -e user:'firefox'

``USER:COMMAND`` runs COMMAND with the qube's shell as USER (``DEFAULT`` is the
qube's default user); ``USER:QUBESRPC SERVICE[+ARG] SOURCE`` runs the qrexec
service as if SOURCE had called it.  Options as in Qubes: ``-d QUBE`` (needed),
``-l LOCAL_PROGRAM`` (its stdin and stdout joined to the remote's stdout and
stdin), ``-e`` (do not wait: exit once the command started), ``-t``/``-T``
(replace escape characters in stdout/stderr), ``-w SECONDS`` (how long to
wait for the qube's agent), ``-W`` (wait for the qube to be running).
Installed at Qubes' path, ``/usr/lib/qubes/qrexec-client``, so tools written
for Qubes' dom0 work unchanged.  The exit code is the remote command's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Sequence

from .. import errors
from ..client import App, RunError
from ..client.connection import Connection
from ..config import socket_path
from .qvm_run import EscapeFilter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qrexec-client", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", dest="domain", required=True, metavar="QUBE")
    p.add_argument("-l", dest="local", metavar="LOCAL_PROGRAM")
    p.add_argument("-e", dest="no_wait", action="store_true")
    p.add_argument("-t", dest="filter_stdout", action="store_true")
    p.add_argument("-T", dest="filter_stderr", action="store_true")
    p.add_argument("-w", dest="timeout", type=float, default=None, metavar="SECONDS")
    p.add_argument("-W", dest="wait_running", action="store_true")
    p.add_argument("cmdline", metavar="USER:COMMAND")
    return p


def parse_cmdline(cmdline: str, default_user: str) -> tuple[str, str, bool, str]:
    """``USER:COMMAND`` or ``USER:QUBESRPC SERVICE SOURCE`` -> (user, command, service, source)."""
    user, sep, rest = cmdline.partition(":")
    if not sep or not user or not rest:
        raise errors.QubesValueError(f"expected USER:COMMAND, got {cmdline!r}")
    if user == "DEFAULT":
        user = default_user
    if rest.startswith("QUBESRPC "):
        words = rest.split()
        if len(words) != 3:
            raise errors.QubesValueError("expected USER:QUBESRPC SERVICE SOURCE")
        return user, words[1], True, words[2]
    return user, rest, False, "dom0"


def _sink(stream: "object", filtered: bool):  # type: ignore[no-untyped-def]
    binary = getattr(stream, "buffer", stream)
    if not filtered:
        return binary
    filt = EscapeFilter(lambda data: (binary.write(data), binary.flush()))  # type: ignore[attr-defined]
    return filt


def main(args: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(args)
    app = App(Connection(socket_path()))
    try:
        vm = app.domains[ns.domain]
        deadline = time.monotonic() + (ns.timeout if ns.timeout is not None else 60)
        while not vm.is_running():
            if not ns.wait_running or time.monotonic() > deadline:
                print(f"qrexec-client: qube {ns.domain!r} is not running", file=sys.stderr)
                return 1
            time.sleep(0.2)
        user, command, service, source = parse_cmdline(ns.cmdline, vm.default_user_name())
        if ns.no_wait and os.fork() != 0:
            return 0  # the child runs the call; with -e the caller does not wait
        local = None
        stdin = sys.stdin.buffer
        stdout = _sink(sys.stdout, ns.filter_stdout)
        if ns.local:
            # the local program's stdout feeds the remote's stdin, and the other way round
            local = subprocess.Popen(ns.local, shell=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
            stdin, stdout = local.stdout, local.stdin  # type: ignore[assignment]
        try:
            code = vm.run_stream(command, user, stdin=stdin, stdout=stdout,
                                 stderr=_sink(sys.stderr, ns.filter_stderr), service=service,
                                 source=source)
        finally:
            if local is not None:
                assert local.stdin is not None
                local.stdin.close()
                local.wait()
        return code
    except RunError as e:
        print(f"qrexec-client: {e}", file=sys.stderr)
        return e.exit_code or 1
    except errors.QubesException as e:
        print(f"qrexec-client: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
