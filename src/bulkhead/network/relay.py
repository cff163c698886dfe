"""dom0's VLAN relay for one netvm: each client's link on a VLAN of its own.

microvm has 8 virtio-mmio transports and no hot-plug, so a netvm cannot get a
network device per client.  It gets one (its *trunk*); this small process,
one per running netvm, joins the trunk to each client's link and puts each
client on its own 802.1Q VLAN (the VLAN id is the client's qid): frames from
client i go to the netvm tagged i; frames from the netvm tagged i go to client
i only, untagged.  What it does to a frame is :mod:`.frames`: a fixed-offset
header, nothing else is read.  Two clients never see each other's frames:
there is no path between two client sockets here.

Every link is a tap in a network namespace of its own whose QEMU end carries
a virtio-net header (so guests keep checksum and segmentation offloads, and a
frame can be a 64 KiB TCP segment); the relay's end is a packet socket bound to
that tap (:mod:`.link`), and each read or write is one frame behind its
virtio-net header.  The daemon
hands the relay each client's end over its control socket (SCM_RIGHTS) when
the client starts or moves to this netvm, and takes it away when it stops or
moves on.  The control socket is a listening one dom0 made (root's, in a
root-only directory), so a daemon that restarts connects again and takes
over: the relay outlives the daemon, and the links keep working.  Control
messages (from the daemon only; ``ready`` greets each new connection)::

    add VID   + one descriptor      ->  "ok"
    del VID                         ->  "ok"
    take VID                        ->  "ok" + a copy of the client's descriptor
                                        (for a new daemon that adopts the qubes)
    list                            ->  "ok VID VID ..."
    watch     + a pidfd             ->  "ok": exit when that process (the netvm's
                                        QEMU) exits
    quit                            ->  the relay exits

Sends never block: a peer that does not read (a stalled QEMU) loses frames,
as a full NIC would, and cannot stall the other clients.  The relay runs
jailed (its own uid, no capabilities, no network namespace of its own but an
empty one, see :mod:`.manager`) and exits when the daemon closes the control
socket listens no more (its netvm's QEMU gone, or ``quit``).

Run as ``python -m bulkhead.network.relay LISTEN_FD TRUNK_FD``.
"""

from __future__ import annotations

import array
import os
import select
import socket
import sys

from .frames import AUXDATA, MAX_FRAME, VNET_HDR, tag, untag, vlan_of

CONTROL_MAX = 64
SOL_PACKET = 263
PACKET_AUXDATA = 8
RECV_MAX = VNET_HDR + MAX_FRAME
AUX_SPACE = socket.CMSG_SPACE(AUXDATA.size)


def _tune(sock: socket.socket) -> None:
    # The link helper sized the buffers (as root, beyond rmem_max): leave them.
    sock.setblocking(False)


class Relay:
    def __init__(self, listener: socket.socket, trunk: socket.socket) -> None:
        self.listener = listener
        self.control: socket.socket | None = None
        self.trunk = trunk
        _tune(trunk)
        self.clients: dict[int, socket.socket] = {}
        self.by_fd: dict[int, int] = {}
        self.poll = select.epoll()
        self.poll.register(listener.fileno(), select.EPOLLIN)
        self.poll.register(trunk.fileno(), select.EPOLLIN)
        self.watched: int | None = None
        self.dropped = 0

    def accept(self) -> None:
        """A (new) daemon connects: it replaces the previous control connection."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.control is not None:
            self.poll.unregister(self.control.fileno())
            self.control.close()
        self.control = conn
        self.poll.register(conn.fileno(), select.EPOLLIN)
        conn.send(b"ready")

    def command(self) -> bool:
        """One control message; False when the relay must exit."""
        assert self.control is not None
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
            # The daemon went (or restarts): keep relaying, wait for the next one.
            for fd in fds:
                os.close(fd)
            self.poll.unregister(self.control.fileno())
            self.control.close()
            self.control = None
            return True
        words = msg.decode("ascii", "replace").split()
        reply = b"ok"
        give: list[int] = []
        if words == ["quit"]:
            return False
        if words == ["list"]:
            reply = b" ".join([b"ok"] + [str(v).encode() for v in sorted(self.clients)])
        elif words == ["watch"] and len(fds) == 1:
            if self.watched is not None:
                self.poll.unregister(self.watched)
                os.close(self.watched)
            self.watched = fds.pop()
            self.poll.register(self.watched, select.EPOLLIN)
        elif len(words) == 2 and words[0] == "take" and words[1].isdigit() \
                and int(words[1]) in self.clients:
            give = [self.clients[int(words[1])].fileno()]
        elif len(words) == 2 and words[0] in ("add", "del") and words[1].isdigit() \
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
        if give:
            self.control.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", give))])
        else:
            self.control.send(reply)
        return True

    def remove(self, vid: int) -> None:
        sock = self.clients.pop(vid, None)
        if sock is not None:
            self.poll.unregister(sock.fileno())
            del self.by_fd[sock.fileno()]
            sock.close()

    def _receive(self, sock: socket.socket) -> tuple[bytes, int | None] | None:
        """One packet and the VLAN the kernel took off it; None when there is none.
        A packet too large for the buffer comes back as b"" (dropped)."""
        try:
            packet, anc, flags, _addr = sock.recvmsg(RECV_MAX, AUX_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None
        aux = None
        for level, kind, data in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                aux = data
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return b"", None
        return packet, vlan_of(aux)

    def from_trunk(self) -> None:
        for _ in range(64):
            got = self._receive(self.trunk)
            if got is None:
                return
            found = untag(*got)
            if found is None:
                self.dropped += 1
                continue
            vid, packet = found
            sock = self.clients.get(vid)
            if sock is None:
                self.dropped += 1
                continue
            try:
                sock.send(packet)
            except OSError:
                self.dropped += 1

    def from_client(self, vid: int) -> None:
        sock = self.clients[vid]
        for _ in range(64):
            got = self._receive(sock)
            if got is None:
                return
            packet, came_with = got
            tagged = tag(packet, vid, came_tagged=came_with != 0)
            if tagged is None:
                self.dropped += 1
                continue
            try:
                self.trunk.send(tagged)
            except OSError:
                self.dropped += 1

    def run(self) -> int:
        while True:
            for fd, _events in self.poll.poll():
                if fd == self.listener.fileno():
                    self.accept()
                elif self.control is not None and fd == self.control.fileno():
                    if not self.command():
                        return 0
                elif fd == self.watched:
                    return 0   # the netvm's QEMU is gone: nothing left to relay
                elif fd == self.trunk.fileno():
                    self.from_trunk()
                else:
                    vid = self.by_fd.get(fd)
                    if vid is not None:
                        self.from_client(vid)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        sys.stderr.write("usage: python -m bulkhead.network.relay LISTEN_FD TRUNK_FD\n")
        return 2
    listener = socket.socket(fileno=int(argv[0]))
    trunk = socket.socket(fileno=int(argv[1]))
    return Relay(listener, trunk).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
