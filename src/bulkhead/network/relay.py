"""dom0's VLAN relay for one netvm: each client's link on a VLAN of its own.

microvm has 8 virtio-mmio transports and no hot-plug, so a netvm cannot get a
network device per client.  It gets one (its *trunk*); this small process,
one per running netvm, joins the trunk to each client's link and puts each
client on its own 802.1Q VLAN (the VLAN id is the client's qid): frames from
client i go to the netvm tagged i; frames from the netvm tagged i go to client
i only, untagged.  What it does to a frame is :mod:`.frames`: a fixed-offset
header, nothing else is read.  Two clients never see each other's frames:
there is no path between two client sockets here.

Every link is an AF_UNIX datagram socket pair (one frame a datagram); the
other end is a QEMU's ``-netdev dgram`` with ``local.type=fd``.  The daemon
hands the relay each client's end over its control socket (SCM_RIGHTS) when
the client starts or moves to this netvm, and takes it away when it stops or
moves on.  Control messages (from the daemon only)::

    add VID   + one descriptor      ->  "ok"
    del VID                         ->  "ok"

Sends never block: a peer that does not read (a stalled QEMU) loses frames,
as a full NIC would, and cannot stall the other clients.  The relay runs
jailed (its own uid, no capabilities, no network namespace of its own but an
empty one, see :mod:`.manager`) and exits when the daemon closes the control
socket.

Run as ``python -m bulkhead.network.relay CONTROL_FD TRUNK_FD``.
"""

from __future__ import annotations

import array
import os
import select
import socket
import sys

from .frames import MAX_FRAME, tag, untag

CONTROL_MAX = 64
SOCKET_BUFFER = 4 * 1024 * 1024


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    sock.setblocking(False)


class Relay:
    def __init__(self, control: socket.socket, trunk: socket.socket) -> None:
        self.control = control
        self.trunk = trunk
        _tune(trunk)
        self.clients: dict[int, socket.socket] = {}
        self.by_fd: dict[int, int] = {}
        self.poll = select.epoll()
        self.poll.register(control.fileno(), select.EPOLLIN)
        self.poll.register(trunk.fileno(), select.EPOLLIN)
        self.dropped = 0

    def command(self) -> bool:
        """One control message; False when the daemon has gone."""
        fds = array.array("i")
        try:
            msg, ancdata, _flags, _addr = self.control.recvmsg(
                CONTROL_MAX, socket.CMSG_SPACE(4 * fds.itemsize))
        except (BlockingIOError, InterruptedError):
            return True
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        if not msg:
            for fd in fds:
                os.close(fd)
            return False
        words = msg.decode("ascii", "replace").split()
        reply = b"ok"
        if len(words) == 2 and words[0] in ("add", "del") and words[1].isdigit() \
                and 0 < int(words[1]) < 4095:
            vid = int(words[1])
            self.remove(vid)
            if words[0] == "add":
                if len(fds) == 1:
                    sock = socket.socket(fileno=fds.pop())
                    _tune(sock)
                    self.clients[vid] = sock
                    self.by_fd[sock.fileno()] = vid
                    self.poll.register(sock.fileno(), select.EPOLLIN)
                else:
                    reply = b"error: add needs one descriptor"
        else:
            reply = b"error: unknown command"
        for fd in fds:
            os.close(fd)
        self.control.send(reply)
        return True

    def remove(self, vid: int) -> None:
        sock = self.clients.pop(vid, None)
        if sock is not None:
            self.poll.unregister(sock.fileno())
            del self.by_fd[sock.fileno()]
            sock.close()

    def from_trunk(self) -> None:
        for _ in range(64):
            try:
                frame = self.trunk.recv(MAX_FRAME + 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            found = untag(frame)
            if found is None:
                self.dropped += 1
                continue
            vid, inner = found
            sock = self.clients.get(vid)
            if sock is None:
                self.dropped += 1
                continue
            try:
                sock.send(inner)
            except OSError:
                self.dropped += 1

    def from_client(self, vid: int) -> None:
        sock = self.clients[vid]
        for _ in range(64):
            try:
                frame = sock.recv(MAX_FRAME + 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            tagged = tag(frame, vid)
            if tagged is None:
                self.dropped += 1
                continue
            try:
                self.trunk.send(tagged)
            except OSError:
                self.dropped += 1

    def run(self) -> int:
        self.control.send(b"ready")
        while True:
            for fd, _events in self.poll.poll():
                if fd == self.control.fileno():
                    if not self.command():
                        return 0
                elif fd == self.trunk.fileno():
                    self.from_trunk()
                else:
                    vid = self.by_fd.get(fd)
                    if vid is not None:
                        self.from_client(vid)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        sys.stderr.write("usage: python -m bulkhead.network.relay CONTROL_FD TRUNK_FD\n")
        return 2
    control = socket.socket(fileno=int(argv[0]))
    trunk = socket.socket(fileno=int(argv[1]))
    return Relay(control, trunk).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
