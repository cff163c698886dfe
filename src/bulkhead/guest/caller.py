"""The calls a qube makes: qrexec-client-vm's side of the guest agent.

A program in the qube (``qrexec-client-vm TARGET SERVICE``) connects to the
agent's local socket, :data:`SOCKET`, and sends one message: the payload
``target\\0service+argument`` with three file descriptors attached
(SCM_RIGHTS): where the call's input comes from, and where the service's
stdout and stderr go.  The agent opens a channel of its own
(:data:`~protocol.GUEST_CHANNEL` set) with a CALL frame; dom0 decides, by
its policy, and joins it to the service in the target qube.  Then the agent
reads the input descriptor into STDIN frames (as far as dom0's credit
allows) and writes STDOUT/STDERR frames into the output descriptors
(crediting dom0 as they drain).  At the end it tells the program over the
socket: ``E`` + a message + newline for each ERROR, then ``X`` + the exit
code (i32, little endian); the program prints the one and exits with the
other.

Like the agent, this imports builtins only, and ``socket`` itself only when
the listener is made (after HELLO: off the path to a started qube).
"""

import os
import select
import stat

from . import protocol as P
from .datadisk import MIN_OUT, widen_pipe

SOCKET = "/run/bulkhead/qrexec-agent.sock"   # also in guest/c/qrexec-client-vm.c
REQUEST_MAX = P.PAYLOAD_LIMIT[P.CALL]
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
TTY_CHUNK = 512
# What one read of a call's input (or, in the agent, of a command's output) may
# take: several frames' worth, so that a bulk stream costs a turn of the agent's
# loop per STREAM_READ bytes rather than per frame (each turn is a poll set
# rebuilt: a fraction of a ms under TCG).
STREAM_READ = 4 * P.MAX_PAYLOAD


class Outgoing:
    """One call this qube makes, on channel ``chan``."""

    def __init__(self, chan, ctl, in_fd, out_fd, err_fd):
        self.chan = chan
        self.ctl = ctl                        # the client's socket: errors and the exit code
        self.in_fd = in_fd                    # read: the call's input (None once at its end)
        self.outs = {P.STDOUT: out_fd, P.STDERR: err_fd}
        self.bufs = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
        self.credit = P.WINDOW                # input bytes dom0 lets us send
        self.sent = 0                         # input bytes sent so far...
        self.credited = 0                     # ...and credited back by dom0
        self.chunks = []                      # (data disk chunk, self.sent after its bytes)
        self.exit_code = None


class Caller:
    def __init__(self, agent):
        self.agent = agent
        self.listener = None
        self.waiting = {}      # client socket fd -> socket, before its request
        self.calls = {}        # chan -> Outgoing
        self.fds = {}          # fd -> (Outgoing or socket, role)
        self._next = 1

    # --- the local socket ---------------------------------------------------------
    def listen(self):
        import socket  # noqa: PLC0415 -- here, after HELLO: see the module documentation

        self._socket = socket
        try:
            os.unlink(SOCKET)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.bind(SOCKET)
        os.chmod(SOCKET, 0o666)   # as in Qubes, every program in the qube may ask dom0
        s.listen(16)
        s.setblocking(False)
        self.listener = s
        self.fds[s.fileno()] = (s, "listen")

    def poll_set(self, want):
        for fd, (obj, role) in self.fds.items():
            if role in ("listen", "client"):
                want[fd] = POLLIN
            elif (role == "in" and obj.credit >= MIN_OUT
                  and len(self.agent.out) < 4 * 1024 * 1024):
                # Not for a few bytes of credit: dom0 gives more as the target reads,
                # and a read that small would go as a frame of its own.
                want[fd] = POLLIN
            elif role == "out" and any(obj.bufs[t] and obj.outs[t] == fd for t in obj.bufs):
                want[fd] = POLLOUT

    def event(self, fd, ev):
        obj, role = self.fds[fd]
        if role == "listen":
            try:
                conn, _ = obj.accept()
            except OSError:
                return
            conn.setblocking(False)
            self.fds[conn.fileno()] = (conn, "client")
            # A client sends its request as soon as it is connected: take it now
            # rather than a turn of the loop later (a fraction of a ms under TCG).
            self.request(conn.fileno(), conn)
        elif role == "client":
            self.request(fd, obj)
        elif role == "in":
            self.read_input(obj)
        elif role == "out":
            self.write_output(obj, fd, ev)

    # --- a new call ------------------------------------------------------------
    def request(self, fd, conn):
        socket = self._socket
        try:
            # Close-on-exec from the start: else every process the agent starts
            # during the call (a spare shell, a service) would inherit the client's
            # pipes and hold them open after the call.
            msg, anc, _, _ = conn.recvmsg(REQUEST_MAX, socket.CMSG_SPACE(3 * 4),
                                          socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return                  # not here yet: POLLIN says when
        except OSError:
            del self.fds[fd]
            conn.close()
            return
        del self.fds[fd]
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)]
        try:
            target, service = P.split_call(msg)
        except P.ProtocolViolation as e:
            self.reply(conn, "bad request: %s" % e, 126, fds)
            return
        if len(fds) != 3 or not self.agent.connected:
            self.reply(conn, "dom0 is not connected" if len(fds) == 3
                       else "the request must carry 3 file descriptors", 126, fds)
            return
        chan = P.GUEST_CHANNEL | self._next
        self._next = self._next % 0x7FFFFFFF + 1
        for f in fds:
            # Non-blocking, except a terminal: that file description is shared with
            # the user's shell, which must not find it non-blocking afterwards.
            # (A write to a terminal after POLLOUT is kept to TTY_CHUNK bytes.)
            if not os.isatty(f):
                os.set_blocking(f, False)
        if stat.S_ISFIFO(os.fstat(fds[0]).st_mode):
            # Room for STREAM_READ and more: with the usual 64 KiB a writer's bytes
            # come a few KiB a wake-up, each a frame.
            widen_pipe(fds[0])
        call = Outgoing(chan, conn, fds[0], fds[1], fds[2])
        self.calls[chan] = call
        self.fds[fds[0]] = (call, "in")
        for t in (P.STDOUT, P.STDERR):
            self.fds.setdefault(call.outs[t], (call, "out"))
        self.agent.send(P.CALL, chan, msg)

    def reply(self, conn, error, code, fds=()):
        for f in fds:
            os.close(f)
        try:
            conn.setblocking(True)
            if error:
                conn.sendall(b"E" + error.encode("utf-8", "replace")[:1024] + b"\n")
            conn.sendall(b"X" + P.i32(code))
        except OSError:
            pass
        conn.close()

    # --- data ----------------------------------------------------------------------
    def read_input(self, call):
        """Called when the input is readable; poll_set asks that only with a page
        (MIN_OUT) of credit or more."""
        disk = self.agent.data_disk
        chunk = disk.take_out()
        if chunk is not None:
            # Into a chunk of our area of the data disk, named by a DATA frame
            # (bulkhead_guest.datadisk): no copy into frames, no virtio-serial write.
            try:
                offset, n = disk.fill_out(chunk, call.in_fd, call.credit)
            except BlockingIOError:
                disk.free_out(chunk)
                return
            except OSError:
                offset, n = None, 0       # as os.read's error below: the input's end
            if offset is not None:
                call.credit -= n
                call.sent += n
                call.chunks.append((chunk, call.sent))
                self.agent.send(P.DATA, call.chan, P.pack_data(P.STDIN, offset, n))
                return
            disk.free_out(chunk)
            data = disk.out_bytes(n)
        else:
            try:
                data = os.read(call.in_fd, min(STREAM_READ, call.credit))
            except BlockingIOError:
                return
            except OSError:
                data = b""
        if data:
            call.credit -= len(data)
            call.sent += len(data)
            self.agent.send_stream(P.STDIN, call.chan, data)
        else:
            del self.fds[call.in_fd]
            os.close(call.in_fd)
            call.in_fd = None
            self.agent.send(P.STDIN, call.chan, b"")

    def write_output(self, call, fd, ev):
        for t, out in call.outs.items():
            if out != fd or not call.bufs[t]:
                continue
            data = call.bufs[t] if not os.isatty(fd) else call.bufs[t][:TTY_CHUNK]
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                return
            except OSError:
                n = len(call.bufs[t])       # the reader went away: drop, as a pipe would
            del call.bufs[t][:n]
            self.agent.send(P.CREDIT, call.chan, P.u32(n))
        self.maybe_finish(call)

    # --- frames from dom0 on our channels -------------------------------------------
    def frame(self, mtype, chan, payload):
        call = self.calls.get(chan)
        if call is None:
            return  # a late frame for a call that ended: harmless
        if mtype in (P.STDOUT, P.STDERR):
            if payload:
                call.bufs[mtype] += payload
                if isinstance(payload, memoryview):   # a DATA run's: copied, so done with
                    self.agent.data_disk.give_back(payload)
        elif mtype == P.CREDIT:
            n = P.parse_u32(payload)
            call.credit += n
            call.credited += n
            # Some of the credit may be dom0's grant (more window, not bytes read): only
            # what exceeds the largest grant surely counts bytes dom0 has read.
            while call.chunks and call.chunks[0][1] <= call.credited - P.GRANT_MAX:
                self.agent.data_disk.free_out(call.chunks.pop(0)[0])   # dom0 has read it
        elif mtype == P.ERROR:
            try:
                call.ctl.sendall(b"E" + payload.replace(b"\n", b" ") + b"\n")
            except OSError:
                pass
        elif mtype == P.EXIT:
            call.exit_code = P.parse_i32(payload)
            self.free_chunks(call)   # what dom0 reads of them now is for an ended call
            self.maybe_finish(call)

    def maybe_finish(self, call):
        if call.exit_code is None or any(call.bufs.values()):
            return
        del self.calls[call.chan]
        fds = [f for f in {call.in_fd, *call.outs.values()} if f is not None]
        for f in fds:
            self.fds.pop(f, None)
        self.reply(call.ctl, None, call.exit_code, fds)

    def free_chunks(self, call):
        for chunk, _ in call.chunks:
            self.agent.data_disk.free_out(chunk)
        call.chunks = []

    def dom0_gone(self):
        """dom0 went away: its calls cannot end any more; tell their programs."""
        for call in list(self.calls.values()):
            self.free_chunks(call)
            call.exit_code = 126
            call.bufs = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
            try:
                call.ctl.sendall(b"Edom0 went away during the call\n")
            except OSError:
                pass
            self.maybe_finish(call)
