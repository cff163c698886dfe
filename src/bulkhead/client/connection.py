"""The connection to the Bulkhead daemon: one unix-socket request per call.

Every Admin API call opens a fresh connection, sends its request, shuts down
its write side and reads the reply to the end, as Qubes' client does.  The
two long-lived exchanges (``admin.Events`` and ``bulkhead.vm.Run``) get the
raw socket from :meth:`Connection.open_stream`.

Tests replace :meth:`Connection.request` (raw reply bytes for a call) or
:meth:`Connection.open_stream` (a connected socket) to run the whole client
and the tools without a daemon.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Iterator

from .. import errors
from ..config import socket_path as default_socket_path
from . import wire

BUF_SIZE = 65536


class Connection:
    """Talks the Admin API to the daemon at ``socket_path`` (default ``$BULKHEAD_SOCKET``)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None) -> None:
        #: the socket's path, as a string
        self.socket_path = (os.fspath(socket_path) if socket_path is not None
                            else default_socket_path())
        #: seconds to wait for a reply; None waits as long as the daemon works
        #: (starting a qube can take a while under TCG)
        self.timeout = timeout

    # --- plumbing -----------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EACCES, errno.EPERM):
                raise errors.QubesDaemonAccessError(
                    f"cannot connect to the Bulkhead daemon at {self.socket_path}: "
                    "permission denied") from None
            raise errors.QubesDaemonCommunicationError(
                f"cannot connect to the Bulkhead daemon at {self.socket_path}: "
                "is `bulkhead daemon` running?") from None
        sock.settimeout(self.timeout)
        return sock

    def open_stream(self, header: bytes, payload: bytes | None = None,
                    shutdown_write: bool = False) -> socket.socket:
        """A connected socket that has sent ``header`` (and ``payload``).

        With ``shutdown_write`` the request is complete (``admin.Events``);
        without, the caller keeps sending (``bulkhead.vm.Run``).
        """
        sock = self._connect()
        try:
            sock.sendall(header + (payload or b""))
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            sock.close()
            raise errors.QubesDaemonCommunicationError(
                f"lost the connection to the Bulkhead daemon: {e.strerror or e}") from None
        return sock

    def request(self, dest: str, method: str, arg: str | None = None,
                payload: bytes = b"") -> bytes:
        """Send one request; returns the raw reply (``0\\0...`` or ``2\\0...``)."""
        sock = self.open_stream(wire.encode_request(method, dest, arg, payload),
                                shutdown_write=True)
        chunks = []
        try:
            while True:
                chunk = sock.recv(BUF_SIZE)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise errors.QubesDaemonCommunicationError(
                f"the Bulkhead daemon did not answer {method} within {self.timeout} s") from None
        except OSError as e:
            raise errors.QubesDaemonCommunicationError(
                f"lost the connection to the Bulkhead daemon: {e.strerror or e}") from None
        finally:
            sock.close()
        return b"".join(chunks)

    # --- the API ------------------------------------------------------------
    def call(self, dest: str, method: str, arg: str | None = None,
             payload: bytes = b"") -> bytes:
        """Call ``method`` on ``dest``; returns the reply body or raises the daemon's exception."""
        return wire.parse_reply(self.request(dest, method, arg, payload))

    def events(self, dest: str = "dom0") -> "EventStream":
        """Subscribe to ``admin.Events`` (all qubes for ``dom0``, else just ``dest``)."""
        return EventStream(self.open_stream(wire.encode_header("admin.Events", dest),
                                            shutdown_write=True))


class EventStream:
    """The events of one ``admin.Events`` subscription; use as a context manager.

    The daemon sends ``connection-established`` first: after it, no event can
    be missed, so callers check the state they wait for only then.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parser = wire.EventParser()
        self._pending: list[wire.Event] = []
        self._ended = False

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def next(self, timeout: float | None = None) -> wire.Event | None:
        """The next event, or None if ``timeout`` seconds pass first.

        Raises QubesDaemonCommunicationError when the daemon ends the stream.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            if self._ended:
                raise errors.QubesDaemonCommunicationError("the daemon ended the event stream")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], remaining)
            if not ready:
                return None
            try:
                data = self._sock.recv(BUF_SIZE)
            except OSError as e:
                raise errors.QubesDaemonCommunicationError(
                    f"lost the connection to the Bulkhead daemon: {e.strerror or e}") from None
            if not data:
                self._ended = True
                self._parser.close()  # raises the daemon's error, if it sent one
                continue
            self._pending.extend(self._parser.feed(data))
        return self._pending.pop(0)

    def __iter__(self) -> Iterator[wire.Event]:
        while True:
            event = self.next()
            if event is None:  # pragma: no cover - no timeout, so never
                return
            yield event
