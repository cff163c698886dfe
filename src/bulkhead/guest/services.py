"""How the agent runs some services in a fork of itself, and the checks that say when.

A service call normally execs the service's file.  Under TCG a new program costs
tens of milliseconds and a Python start ~0.3 s, so dom0's network configuration,
the file-copy unpacker and Qubes' socket services run in a fork of the agent, and
plain ``#!/bin/sh`` services are sourced by a prespawned shell.
"""

import os
import select
import sys

READ_CHUNK = 65536

NETCONF_SERVICE = "bulkhead.NetConfig"


def netconf_main():
    """In a forked child: apply the network configuration on stdin (imported here only)."""
    from . import netconf  # noqa: PLC0415 -- only when dom0 configures the network
    return netconf.main()


FILECOPY_SERVICE = "/etc/qubes-rpc/qubes.Filecopy"


def filecopy_main():
    """In a forked child, as the user: the qubes.Filecopy unpacker (what that file runs)."""
    from . import filecopy  # noqa: PLC0415 -- only a qube that is sent files needs it
    code = 1
    try:
        code = filecopy.unpacker_main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def plain(word):
    return bool(word) and all(c.isascii() and (c.isalnum() or c in "._-") for c in word)


def is_sh_script(path):
    """An executable ``#!/bin/sh`` script, whose name and arguments are plain words
    (service names, qube names: checked by the protocol), so safe in a shell line."""
    if not os.access(path, os.X_OK) or not all(c.isalnum() or c in "/._+-" for c in path):
        return False
    try:
        with open(path, "rb") as f:
            return f.readline(64).rstrip() == b"#!/bin/sh"
    except OSError:
        return False


def mode(path):
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def socket_relay(path, header):
    """In a forked child: join stdin/stdout to a socket service; 0 when it hangs up."""
    import socket  # noqa: PLC0415 -- only socket services need it

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(header)
    except OSError as e:
        os.write(2, ("cannot connect to %s: %s\n" % (path, e)).encode())
        return 127
    sock = s.fileno()
    open_in = True
    while True:
        for fd in _readable([0] if open_in else [], sock):
            data = os.read(fd, READ_CHUNK)
            if fd == sock:
                if not data:
                    return 0
                _write_all(1, data)
            elif data:
                s.sendall(data)
            else:
                open_in = False
                s.shutdown(socket.SHUT_WR)


def _readable(fds, sock):
    poller = select.poll()
    for fd in fds + [sock]:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll()]


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]
