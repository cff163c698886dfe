"""Run a short-lived helper program that makes file descriptors and passes them back.

dom0's daemon never leaves its own (empty) network namespace; what must be made in
another one -- a tap in a test's namespace, the links' namespaces -- is made by a
helper (``python -m bulkhead.network.<module>``) that sends the descriptors back
over a socket pair (``SCM_RIGHTS``) with ``b"ok"``, or a one-line error, and exits.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import subprocess
import sys

HELPER_TIMEOUT = 20.0


def helper_env() -> dict[str, str]:
    """The helper's whole environment (it imports bulkhead, as the daemon did)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


async def run_for_fds(prefix: list[str], module: str, args: list[str], count: int,
                      what: str, error: type[Exception]) -> list[int]:
    """Run ``prefix + [python, -m, module, *args, FD]``; the ``count`` descriptors it sent.

    ``what`` names the helper in errors (``error``, with its stderr's last line)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", module, *args, str(theirs.fileno()),
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=helper_env())
        theirs.close()
        try:
            _out, err = await asyncio.wait_for(proc.communicate(), HELPER_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            raise error(f"the {what} did not answer") from None
        why = err.decode(errors="replace").strip()[-300:]
        ours.setblocking(False)
        try:
            msg, anc, _f, _a = ours.recvmsg(512, socket.CMSG_SPACE(4 * count))
        except BlockingIOError:
            raise error(f"the {what} failed: {why}") from None
        fds = [fd for level, kind, data in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", data[:len(data) - len(data) % 4])]
        if msg != b"ok" or len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise error(msg.decode(errors="replace")[:500] or f"the {what} failed: {why}")
        return fds
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()
