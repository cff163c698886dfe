"""The Admin API server: a unix socket speaking Qubes' qubesd protocol.

Every client is treated as hostile until its request has been checked:

- the header must end with a NUL within :data:`protocol.MAX_HEADER` bytes
  and have Qubes' shape (see :mod:`bulkhead.api.protocol`);
- the payload is read to the client's EOF, up to the method's
  ``max_payload`` (64 KiB unless a method says otherwise);
- header and payload must arrive within ``read_timeout`` seconds;
- at most ``max_connections`` connections are served at once, at most
  ``per_client`` of them from one client process, and at most ``per_qube``
  calls on one target qube: a qube that stalls its calls (a guest that never
  takes their input, say) exhausts only its own budget, never the API; the
  next ones get an error reply at once, naming what is over its budget;
- every refused request gets an error reply with Qubes' exception class
  (ProtocolError, QubesValueError, QubesVMNotFoundError...) and a log line;
  an unexpected exception is logged with its traceback and answered with a
  generic QubesException.  Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import (PermissionDenied, ProtocolError, QubesException, QubesVMNotFoundError)
from ..vm import validate_name
from . import protocol
from .registry import REGISTRY, Call, MethodSpec, Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App

log = logging.getLogger("bulkhead.api")

#: seconds a finished connection may take to flush its reply before it is cut
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Limits:
    max_header: int = protocol.MAX_HEADER
    read_timeout: float = 30.0
    max_connections: int = 512
    per_client: int = 128
    per_qube: int = 32


class AdminServer:
    """Serve ``app`` on the unix socket ``socket_path``."""

    def __init__(self, app: "App", socket_path: Path | str, *, registry: Registry | None = None,
                 limits: Limits | None = None, socket_mode: int = 0o660) -> None:
        self.app = app
        self.socket_path = Path(socket_path)
        self.registry = registry or REGISTRY
        self.limits = limits or Limits()
        self.socket_mode = socket_mode
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._per_client: collections.Counter[int] = collections.Counter()
        self._per_qube: collections.Counter[str] = collections.Counter()

    # --- the socket -----------------------------------------------------------------
    async def start(self) -> None:
        self._remove_stale_socket()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o117)  # never world-accessible, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, self.socket_mode)
        _give_to_group_qubes(self.socket_path)
        log.info("Admin API listening on %s", self.socket_path)

    def _remove_stale_socket(self) -> None:
        """Remove a socket left by a dead daemon; refuse if a live one answers."""
        try:
            mode = self.socket_path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.socket_path.unlink(missing_ok=True)
        else:
            raise FileExistsError(f"another daemon is listening on {self.socket_path}")
        finally:
            probe.close()

    async def close(self) -> None:
        """Stop accepting, end the connections in progress, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._connections.items()):
            writer.transport.abort()  # do not wait for clients that do not read
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    # --- one connection -------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = _peer_pid(writer)
        refusal = None
        if len(self._connections) >= self.limits.max_connections:
            refusal = "Too many connections to the Admin API; try again later"
        elif self._per_client[client] >= self.limits.per_client:
            refusal = (f"Too many connections to the Admin API from this client (pid {client}): "
                       f"at most {self.limits.per_client} at once")
        if refusal:
            log.warning("refusing a connection: %s (%d connections)", refusal,
                        len(self._connections))
            await self._reply(writer, protocol.encode_error(QubesException(refusal)))
            await self._close(writer)
            return
        self._connections[task] = writer
        self._per_client[client] += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.pop(task, None)
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
            await self._close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header: protocol.Header | None = None
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.limits.read_timeout
            untrusted_header = await _within(self._read_header(reader), self.limits.read_timeout)
            header = protocol.parse_header(untrusted_header)
            spec = self.registry.lookup(header.method)
            if spec is None:
                raise ProtocolError(f"no such method: {header.method!r}")
            call = self._make_call(header, spec)
            with self._qube_budget(call):
                await self._dispatch(call, spec, reader, writer, deadline)
        except (ProtocolError, PermissionDenied, QubesException) as exc:
            # A malformed request is worth a warning; Qubes' ordinary answers
            # ("no such feature", "not running"...) are part of normal use.
            level = logging.INFO if isinstance(exc, QubesException) else logging.WARNING
            log.log(level, "refused %s: %s: %s",
                    header.describe() if header else "<no valid header>",
                    type(exc).__name__, exc)
            await self._reply(writer, protocol.encode_error(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("client went away during %s: %s",
                     header.describe() if header else "a request", exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the server must survive any request
            log.exception("unexpected error handling %s",
                          header.describe() if header else "a request")
            await self._reply(writer, protocol.encode_error(QubesException(
                "Internal error of the Bulkhead daemon; see its log")))

    async def _dispatch(self, call: Call, spec: MethodSpec, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, deadline: float) -> None:
        if spec.streaming:
            await spec.handler(call, reader, writer)
            return
        untrusted_payload = await _within(self._read_payload(reader, spec.max_payload),
                                          deadline - asyncio.get_running_loop().time())
        result = await _run_plain(call, spec, untrusted_payload)
        await self._reply(writer, protocol.encode_reply(result))

    async def call_from_qube(self, source: str, untrusted_method: str, untrusted_arg: str,
                             untrusted_dest: str, untrusted_payload: bytes) -> bytes:
        """One request a qube makes through qrexec (``admin.*``, which the qrexec
        policy allowed); the encoded reply.  ``source`` is from the qube's channel.

        Bulkhead's own ``bulkhead.*`` methods and streams stay dom0's, whatever
        the policy says."""
        header = protocol.Header(untrusted_method, untrusted_arg, source, untrusted_dest)
        try:
            spec = self.registry.lookup(untrusted_method)
            if spec is None or not untrusted_method.startswith("admin."):
                raise PermissionDenied(f"{untrusted_method!r} is not served to qubes")
            if spec.streaming:
                raise PermissionDenied(f"{untrusted_method} is not served to qubes (a stream)")
            if len(untrusted_payload) > spec.max_payload:
                raise ProtocolError(f"payload longer than {spec.max_payload} bytes")
            call = self._make_call(header, spec, src=self.app.domains[source])
            with self._qube_budget(call):
                return protocol.encode_reply(await _run_plain(call, spec, untrusted_payload))
        except (ProtocolError, PermissionDenied, QubesException) as exc:
            log.info("refused %s: %s: %s", header.describe(), type(exc).__name__, exc)
            return protocol.encode_error(exc)
        except Exception:  # noqa: BLE001 - the server must survive any request
            log.exception("unexpected error handling %s", header.describe())
            return protocol.encode_error(QubesException(
                "Internal error of the Bulkhead daemon; see its log"))

    @contextlib.contextmanager
    def _qube_budget(self, call: Call) -> Iterator[None]:
        """Count the call against its target qube's budget of calls in progress."""
        if call.dest is None or call.dest.qid == 0:
            yield
            return
        name = call.dest.name
        if self._per_qube[name] >= self.limits.per_qube:
            raise QubesException(
                f"qube {name!r} is over its budget of {self.limits.per_qube} Admin API calls "
                f"in progress (its calls are not ending; is the qube stalling them?); "
                f"try again once some end")
        self._per_qube[name] += 1
        try:
            yield
        finally:
            self._per_qube[name] -= 1
            if not self._per_qube[name]:
                del self._per_qube[name]

    async def _read_header(self, reader: asyncio.StreamReader) -> bytes:
        try:
            untrusted_header = await reader.readuntil(b"\0")
        except asyncio.IncompleteReadError:
            raise ProtocolError("the request has no header (no NUL before the end)") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"request header longer than {self.limits.max_header} "
                                f"bytes") from None
        if len(untrusted_header) - 1 > self.limits.max_header:
            raise ProtocolError(f"request header longer than {self.limits.max_header} bytes")
        return untrusted_header[:-1]

    @staticmethod
    async def _read_payload(reader: asyncio.StreamReader, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await reader.read(min(65536, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise ProtocolError(f"payload longer than {limit} bytes")
            chunks.append(chunk)

    def _make_call(self, header: protocol.Header, spec: MethodSpec, src: Any = None) -> Call:
        app = self.app
        if src is None:
            # The socket is dom0's (mode 0660): calls from qubes come through qrexec
            # and its policy (call_from_qube), never on this socket.
            if header.src != "dom0":
                raise PermissionDenied(f"calls from {header.src!r} are not allowed on this "
                                       f"socket")
            src = app.domains["dom0"]
        dest = self._decode_dest(header.dest)
        is_dom0 = dest.qid == 0
        if spec.dest == "dom0" and not is_dom0:
            raise ProtocolError(f"{spec.name} must be called on dom0")
        if spec.dest == "vm" and is_dom0:
            raise ProtocolError(f"{spec.name} cannot be called on dom0")
        if spec.arg is True and not header.arg:
            raise ProtocolError("expected an argument")
        if spec.arg is False and header.arg:
            raise ProtocolError("unexpected argument")
        return Call(app=app, src=src, dest=dest, method=header.method, arg=header.arg,
                    endpoint=spec.endpoint)

    def _decode_dest(self, untrusted_dest: str) -> Any:
        if untrusted_dest.startswith("uuid:"):
            vm = self.app.domains.get(untrusted_dest)
            if vm is None:
                raise QubesVMNotFoundError(untrusted_dest)
            return vm
        if untrusted_dest != "dom0":
            validate_name(None, None, untrusted_dest)
        return self.app.domains[untrusted_dest]

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass
        writer.close()
        try:
            # A client that does not read would keep the reply buffered forever.
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            writer.transport.abort()
        except (OSError, RuntimeError):
            pass


async def _run_plain(call: Call, spec: MethodSpec, untrusted_payload: bytes) -> Any:
    """Check a plain method's payload against its rule, then run it."""
    if spec.payload is True and not untrusted_payload:
        raise ProtocolError("expected payload")
    if spec.payload is False and untrusted_payload:
        raise ProtocolError("unexpected payload")
    call.untrusted_payload = untrusted_payload
    return await spec.handler(call)


def _give_to_group_qubes(path: "os.PathLike[str] | str") -> None:
    """root:qubes, as in Qubes: the desktop user (in group qubes) runs the GUI and the tools."""
    import grp  # noqa: PLC0415
    try:
        os.chown(path, -1, grp.getgrnam("qubes").gr_gid)
    except (KeyError, OSError):
        pass   # no group qubes here (a test instance): root only


def _peer_pid(writer: asyncio.StreamWriter) -> int:
    """The client's process id (SO_PEERCRED), for its budget of connections; 0 if unknown."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except (AttributeError, OSError):
        return 0


async def _within(read: Any, seconds: float) -> Any:
    """Await a read of the request; a client too slow to send it gets a ProtocolError."""
    try:
        return await asyncio.wait_for(read, max(0.0, seconds))
    except asyncio.TimeoutError:
        raise ProtocolError("timeout: the request was not sent in time") from None
