"""The client side of ``bulkhead.vm.Run``: a command's stdio relayed both ways.

Admin API calls are one request and one reply; qvm-run needs its standard
streams carried while the command runs.  Bulkhead adds this one streaming
method:

1. the client sends the header ``bulkhead.vm.Run dom0 name VMNAME\\0`` and keeps
   the connection open;
2. it sends frames of :mod:`bulkhead.guest.protocol`, all on channel 1: one
   EXEC (``user\\0command``) or SERVICE (``user\\0service+arg\\0dom0``), then
   STDIN frames (an empty one is the end of stdin), and SIGNAL if the user
   interrupts;
3. the daemon answers with STDOUT/STDERR frames (an empty one is the end of
   that stream), ERROR (the command could not start) and finally EXIT (i32).

If the daemon refuses the request itself it sends an ordinary error reply
(``2\\0TYPE\\0...``) instead of frames.  The first two bytes tell them apart:
a frame starts with its u16 type (STDOUT is ``04 00``), an error reply with
``32 00`` ("2\\0"), which is no frame type.

Deadlock-free relaying: the socket is always read, and stdin is read only
while the bytes not yet sent to the daemon stay under a limit.  So a command
that produces output without reading its input never blocks the client, and a
client with much input never makes the daemon buffer without bound.
"""

from __future__ import annotations

import io
import os
import selectors
import signal
import socket
import threading
from typing import TYPE_CHECKING, BinaryIO, Callable, Union

from .. import errors
from ..guest import protocol as p
from . import wire

if TYPE_CHECKING:  # pragma: no cover
    from .connection import Connection

METHOD = "bulkhead.vm.Run"
CHANNEL = 1
#: stop reading stdin while this many bytes wait to be sent to the daemon
SEND_HIGH_WATER = 4 * p.MAX_PAYLOAD
CHUNK = 16384
FROM_DAEMON = frozenset({p.STDOUT, p.STDERR, p.EXIT, p.ERROR, p.CREDIT})
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Where output goes: a binary file object, a callable taking bytes, or None (discarded).
Sink = Union[BinaryIO, Callable[[bytes], object], None]


class RunError(errors.QubesException):
    """The command could not start (the daemon sent ERROR); ``exit_code`` is what EXIT said."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def request_frame(command: str, user: str, service: bool, source: str = wire.SOURCE) -> bytes:
    """The EXEC or SERVICE frame that starts the call (a service sees ``source`` as
    its caller: dom0 unless dom0's ``qrexec-client`` says otherwise)."""
    if not user or len(user.encode()) > p.MAX_USER or "\0" in user:
        raise errors.QubesValueError(f"invalid user name {user!r}")
    if service:
        if not p.valid_service_name(command):
            raise errors.QubesValueError(f"invalid service name {command!r}")
        return p.pack(p.SERVICE, CHANNEL, f"{user}\0{command}\0{source}".encode("ascii"))
    data = command.encode("utf-8")
    if not data or len(data) > p.MAX_COMMAND or b"\0" in data:
        raise errors.QubesValueError("the command must be 1 to %d bytes without NUL" % p.MAX_COMMAND)
    return p.pack(p.EXEC, CHANNEL, user.encode("utf-8") + b"\0" + data)


def _writer(sink: Sink) -> Callable[[bytes], None]:
    """A function that delivers output to ``sink`` at once (no buffering: it may be a terminal)."""
    if sink is None:
        return lambda data: None

    def write(data: bytes) -> None:
        if hasattr(sink, "write"):
            sink.write(data)  # type: ignore[union-attr]
            sink.flush()  # type: ignore[union-attr]
        else:
            sink(data)  # type: ignore[operator]
    return write


def _stdin_fd(stdin: "BinaryIO | int | None") -> int | None:
    """The file descriptor behind ``stdin``, or None for objects without one (BytesIO)."""
    if isinstance(stdin, int):
        return stdin
    try:
        return stdin.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return None


class _Relay:
    """One Run call's state: the socket, stdin, the output sinks, the outgoing buffer."""

    def __init__(self, sock: socket.socket, stdin: "BinaryIO | int | None",
                 stdout: Sink, stderr: Sink) -> None:
        self.sock = sock
        self.stdin = stdin
        # read the descriptor directly when there is one: a Python-level
        # buffer could hold data that select() would never report
        self.read_fd = _stdin_fd(stdin)
        self.poll_fd = self.read_fd  # None once it proves unpollable (a regular file)
        self.stdin_open = stdin is not None
        self.out = {p.STDOUT: _writer(stdout), p.STDERR: _writer(stderr)}
        self.outbuf = bytearray()
        self.reader = p.FrameReader(FROM_DAEMON)
        self.first = bytearray()     # the reply's first bytes, until we know it is frames
        self.framed = False
        self.error_message: str | None = None
        self.exit_code: int | None = None
        self.pending_signals: list[int] = []  # appended to by signal handlers
        if stdin is None:
            self.queue(p.pack(p.STDIN, CHANNEL))  # no input: end of stdin at once

    # --- outgoing -------------------------------------------------------------
    def queue(self, frame: bytes) -> None:
        self.outbuf += frame

    def send_some(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            self.outbuf += p.pack(p.SIGNAL, CHANNEL, p.u32(signum))
        if not self.outbuf:
            return
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except (BrokenPipeError, ConnectionResetError):
            # the daemon stopped listening (the command ended): input is moot
            self.outbuf.clear()
            self.stdin_open = False
            return
        del self.outbuf[:sent]

    def read_stdin(self) -> None:
        try:
            if self.read_fd is not None:
                data = os.read(self.read_fd, CHUNK)
            else:
                data = self.stdin.read(CHUNK)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.queue(p.pack(p.STDIN, CHANNEL, data))
        else:
            self.stdin_open = False
            self.queue(p.pack(p.STDIN, CHANNEL))  # the end of stdin

    # --- incoming ---------------------------------------------------------------
    def received(self, data: bytes) -> None:
        if not self.framed:
            self.first += data
            if len(self.first) < 2:
                return
            if self.first.startswith(wire.EXCEPTION):
                return  # an error reply: collected whole, raised at EOF
            self.framed = True
            data = bytes(self.first)
            self.first.clear()
            if data.startswith(wire.OK):
                # tolerated: a daemon that acknowledges before streaming
                data = data[2:]
        try:
            frames = self.reader.feed(data)
        except p.ProtocolViolation as e:
            raise errors.QubesDaemonCommunicationError(f"invalid Run stream from the daemon: {e}") from None
        for mtype, chan, payload in frames:
            if chan != CHANNEL:
                raise errors.QubesDaemonCommunicationError(f"Run stream frame on channel {chan}")
            if mtype in self.out:
                if payload:
                    self.out[mtype](payload)
            elif mtype == p.ERROR:
                self.error_message = payload.decode("utf-8", "replace")
            elif mtype == p.EXIT:
                self.exit_code = p.parse_i32(payload)
            # CREDIT: flow control is the socket's own here; nothing to do

    def ended(self) -> None:
        """The daemon closed the connection: turn what we have into a result or an error."""
        if not self.framed:
            if self.first.startswith(wire.EXCEPTION):
                wire.parse_reply(bytes(self.first))  # raises the daemon's exception
            raise errors.QubesDaemonCommunicationError(
                "the daemon closed the Run stream without an answer")
        if self.exit_code is None:
            if self.error_message is not None:
                self.exit_code = 1  # ERROR said why; the missing EXIT adds nothing
                return
            raise errors.QubesDaemonCommunicationError(
                "the daemon closed the Run stream before the command's exit code")


def run_stream(connection: "Connection", vm_name: str, command: str, user: str, *,
               stdin: "BinaryIO | int | None" = None, stdout: Sink = None, stderr: Sink = None,
               service: bool = False, forward_signals: bool = False,
               source: str = wire.SOURCE) -> int:
    """Run ``command`` in ``vm_name`` through the daemon; returns the exit code.

    ``stdin`` is a file object or descriptor (a terminal, a pipe, a file,
    BytesIO) or None for no input (the command sees end-of-file at once).
    With ``forward_signals`` (only from the main thread) SIGINT, SIGTERM and
    SIGHUP are sent to the command instead of ending the client.
    """
    frame = request_frame(command, user, service, source)
    header = wire.encode_header(METHOD, vm_name, plus=False)
    sock = connection.open_stream(header, frame)
    relay = _Relay(sock, stdin, stdout, stderr)
    restore: dict[int, object] = {}
    if forward_signals and threading.current_thread() is threading.main_thread():
        interrupts = [0]

        def forward(signum: int, _frame: object) -> None:
            relay.pending_signals.append(signum)
            if signum == signal.SIGINT:
                # a command that ignores SIGINT must not trap the user: the
                # third Ctrl-C abandons it
                interrupts[0] += 1
                if interrupts[0] >= 3:
                    raise KeyboardInterrupt
        for signum in FORWARDED_SIGNALS:
            restore[signum] = signal.signal(signum, forward)
    try:
        _loop(relay)
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        sock.close()
    if relay.error_message is not None:
        raise RunError(relay.error_message, relay.exit_code or 1)
    assert relay.exit_code is not None
    return relay.exit_code


def _loop(relay: _Relay) -> None:
    sock = relay.sock
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    stdin_registered = False
    try:
        while relay.exit_code is None:
            want_stdin = relay.stdin_open and len(relay.outbuf) < SEND_HIGH_WATER
            if want_stdin and relay.poll_fd is None:
                relay.read_stdin()  # BytesIO, regular files: always ready
            if stdin_registered and not (want_stdin and relay.poll_fd is not None):
                sel.unregister(relay.poll_fd)
                stdin_registered = False
            elif want_stdin and relay.poll_fd is not None and not stdin_registered:
                try:
                    sel.register(relay.poll_fd, selectors.EVENT_READ, "stdin")
                    stdin_registered = True
                except (ValueError, OSError):
                    relay.poll_fd = None  # epoll refuses regular files: read them directly
                    continue
            busy = bool(relay.outbuf or relay.pending_signals)
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if busy else 0))
            # the timeout only bounds how late a forwarded signal is sent
            for key, mask in sel.select(timeout=0 if want_stdin and relay.poll_fd is None else 0.2):
                if key.data == "stdin":
                    relay.read_stdin()
                    continue
                if mask & selectors.EVENT_WRITE:
                    relay.send_some()
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(p.MAX_PAYLOAD + p.HEADER_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        relay.ended()
                        return
                    relay.received(data)
            if relay.pending_signals:
                relay.send_some()
    finally:
        sel.close()
