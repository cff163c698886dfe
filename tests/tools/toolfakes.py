"""A fake transport for testing the client and the tools without a daemon.

Modelled on how Qubes' own client tests work: each test fills
``expected_calls`` with ``(dest, method, arg, payload) -> raw reply`` (the
exact Qubes wire format, ``b"0\\x00..."`` or ``b"2\\x00Type\\x00..."``), runs a
tool's ``main(args, app)`` and checks the output and that every expected call
was made.  A call nobody expected fails the test with the call in the message.

Streams (``bulkhead.vm.Run``, ``admin.Events``) get a real socketpair whose
other end is served by a handler thread the test provides.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from bulkhead.client import Connection

Call = tuple[str, str, "str | None", bytes]


class FakeConnection(Connection):
    def __init__(self) -> None:
        super().__init__("/nonexistent/fake.sock")
        #: (dest, method, arg, payload) -> reply bytes, or a list of replies in order
        self.expected_calls: dict[Call, bytes | list[bytes]] = {}
        self.calls: list[Call] = []
        #: header bytes -> handler(sock) run in a thread for open_stream; the
        #: handler reads the request (header, then payload) from sock as a daemon would
        self.stream_handlers: dict[bytes, Callable[[socket.socket], None]] = {}
        self.streams: list[tuple[bytes, bytes | None]] = []
        #: set when the test is over: long-lived stream handlers wait on it
        self.finished = threading.Event()
        self._threads: list[threading.Thread] = []

    def request(self, dest: str, method: str, arg: str | None = None,
                payload: bytes = b"") -> bytes:
        key = (dest, method, arg, payload or b"")
        self.calls.append(key)
        if key not in self.expected_calls:
            raise AssertionError(f"unexpected call {key!r}")
        reply = self.expected_calls[key]
        if isinstance(reply, list):
            if not reply:
                raise AssertionError(f"call {key!r} made more often than expected")
            return reply.pop(0) if len(reply) > 1 else reply[0]
        return reply

    def open_stream(self, header: bytes, payload: bytes | None = None,
                    shutdown_write: bool = False) -> socket.socket:
        self.streams.append((header, payload))
        handler = self.stream_handlers.get(header)
        if handler is None:
            raise AssertionError(f"unexpected stream {header!r}")
        ours, theirs = socket.socketpair()
        ours.sendall(header + (payload or b""))
        if shutdown_write:
            ours.shutdown(socket.SHUT_WR)
        thread = threading.Thread(target=self._serve, args=(handler, theirs), daemon=True)
        thread.start()
        self._threads.append(thread)
        return ours

    @staticmethod
    def _serve(handler: Callable[[socket.socket], None], sock: socket.socket) -> None:
        try:
            handler(sock)
        finally:
            sock.close()

    def assert_all_called(self) -> None:
        missing = [key for key in self.expected_calls if key not in self.calls]
        assert not missing, f"expected calls not made: {missing!r}"
        self.finished.set()
        for thread in self._threads:
            thread.join(5)


def vm_list(*lines: str) -> bytes:
    """An ``admin.vm.List`` reply: ``vm_list("work class=AppVM state=Running")``."""
    return b"0\x00" + "".join(line + "\n" for line in lines).encode()


def get_all(**props: str) -> bytes:
    """A ``property.GetAll`` reply, values given as ``"default=True type=str x"``."""
    return b"0\x00" + "".join(f"{k} {v}\n" for k, v in props.items()).encode()


def get_all_of_all(qubes: dict[str, bytes]) -> bytes:
    """A ``bulkhead.vm.property.GetAllOfAll`` reply from each qube's ``get_all()`` reply:
    every line of a qube's GetAll, prefixed with the qube's name."""
    lines = []
    for name, reply in qubes.items():
        assert reply.startswith(b"0\x00")
        lines += [name.encode() + b" " + line + b"\n" for line in reply[2:].split(b"\n") if line]
    return b"0\x00" + b"".join(lines)


def error(exc_type: str, message: str = "", *args: str) -> bytes:
    """A Qubes error reply."""
    return (b"2\x00" + exc_type.encode() + b"\x00\x00" + message.encode() + b"\x00"
            + b"".join(a.encode() + b"\x00" for a in args))
