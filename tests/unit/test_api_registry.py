"""The method registry, and the extension point for streaming methods (bulkhead.vm.Run)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from bulkhead.api import Call, Registry, load_methods
from bulkhead.guest import protocol as guest
from core_helpers import ServerThread, error, standard_system


def _registry() -> Registry:
    registry = Registry()

    @registry.stream("test.Echo", dest="vm")
    async def echo(call: Call, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        # A streaming handler owns the connection: here, guest-protocol frames echoed back.
        if not call.dest.is_running():
            writer.write(b"2\0" + b"QubesVMNotRunningError\0\0not running\0")
            return
        writer.write(b"0\0")
        while True:
            header = await reader.readexactly(guest.HEADER_SIZE)
            mtype, chan, length = guest.parse_header(header, guest.FROM_DOM0)
            payload = await reader.readexactly(length)
            writer.write(guest.pack(guest.STDOUT, chan, payload))
            await writer.drain()
            if not payload:
                return

    @registry.method("test.Plain", arg=True, payload=None, max_payload=10)
    async def plain(call: Call) -> str:
        return f"{call.dest.name} {call.arg} {call.untrusted_payload.decode()}"

    return registry


def test_registry_rules() -> None:
    registry = Registry()

    @registry.method("x.Y.{endpoint}", endpoints=("A", "B"))
    async def handler(call: Call) -> None:
        return None

    assert registry.names() == ["x.Y.A", "x.Y.B"]
    assert registry.lookup("x.Y.A").endpoint == "A"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        registry.method("x.Y.A")(handler)
    with pytest.raises(ValueError):
        registry.method("x.Z", dest="somewhere")(handler)
    assert "admin.Events" in load_methods().names()


def test_streaming_method_takes_over_the_connection(tmp_path: Path) -> None:
    with ServerThread(tmp_path, setup=standard_system, registry=_registry()) as srv:
        assert srv.call("work", "test.Plain", "a", b"payload") == b"0\0work a payload"
        assert error(srv.call("work", "test.Plain", "a", b"x" * 11))[0] == "ProtocolError"
        assert error(srv.call("dom0", "test.Echo"))[0] == "ProtocolError"  # dest="vm"
        assert error(srv.call("nope", "test.Echo"))[0] == "QubesVMNotFoundError"
        assert error(srv.call("work", "test.Echo"))[0] == "QubesVMNotRunningError"
        srv.run(srv.app.domains["work"].start())
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(srv.socket))
        # header and first frame in one write: the handler must still see the frame
        s.sendall(b"test.Echo+ dom0 name work\0" + guest.pack(guest.STDIN, 1, b"hello"))
        assert s.recv(2) == b"0\0"
        reply = b""
        while len(reply) < guest.HEADER_SIZE + 5:
            reply += s.recv(4096)
        assert reply == guest.pack(guest.STDOUT, 1, b"hello")
        s.sendall(guest.pack(guest.STDIN, 1, b""))
        rest = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        assert rest == guest.pack(guest.STDOUT, 1, b"")
        s.close()


def test_stream_handler_error_before_writing_is_an_error_reply(tmp_path: Path) -> None:
    from bulkhead.errors import QubesVMNotRunningError

    registry = Registry()

    @registry.stream("test.Refuse", dest="vm")
    async def refuse(call: Call, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        raise QubesVMNotRunningError(call.dest)

    with ServerThread(tmp_path, setup=standard_system, registry=registry) as srv:
        assert error(srv.call("work", "test.Refuse")) == (
            "QubesVMNotRunningError",
            "Domain not running (either powered off or paused): 'work'")
