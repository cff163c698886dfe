"""A fake guest agent for the tests of dom0's end of the agent link (bulkhead.agentlink).

It plays the QEMU chardev socket and speaks the protocol from the guest side,
parsing what dom0 sends with the guest's own FrameReader, so that dom0
breaking the protocol fails the test too.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from bulkhead import agentlink
from bulkhead.agentlink import AgentLink, LinkState
from bulkhead.guest import protocol as P

WINDOW = P.WINDOW


def run(coro: Awaitable[Any], timeout: float = 15.0) -> Any:
    """Run one test scenario; a hang becomes a failure instead of a stuck test run."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def header(mtype: int, chan: int, length: int, flags: int = 0) -> bytes:
    return struct.pack("<HHII", mtype, flags, chan, length)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Any:
    """A directory for unix sockets: sun_path holds ~107 bytes, pytest's tmp_path may be longer."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="bh-al-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class GuestEnd:
    """One connection, as the guest agent sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = P.FrameReader(P.FROM_DOM0)   # dom0 must keep the protocol too
        self.pending: list[tuple[int, int, bytes]] = []

    async def send(self, mtype: int, chan: int, payload: bytes = b"") -> None:
        await self.send_raw(P.pack(mtype, chan, payload))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def hello(self, version: int = P.VERSION) -> None:
        await self.send(P.HELLO, 0, P.u32(version))

    async def recv(self, timeout: float = 2.0) -> tuple[int, int, bytes]:
        """The next frame dom0 sent."""
        async def next_frame() -> tuple[int, int, bytes]:
            while not self.pending:
                data = await self.reader.read(65536)
                assert data, "dom0 closed the link while the guest expected a frame"
                self.pending += self.parser.feed(data)
            return self.pending.pop(0)
        return await asyncio.wait_for(next_frame(), timeout)

    async def nothing_for(self, seconds: float) -> None:
        """Assert that dom0 sends nothing for ``seconds``."""
        assert not self.pending, f"unexpected frames from dom0: {self.pending}"
        try:
            data = await asyncio.wait_for(self.reader.read(65536), seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"dom0 sent {data!r} when it should have been waiting")

    async def expect_closed(self, timeout: float = 2.0) -> None:
        """dom0 closed its end: reads end (any frames sent before are skipped)."""
        async def until_eof() -> None:
            while True:
                try:
                    if not await self.reader.read(65536):
                        return
                except ConnectionError:
                    return
        await asyncio.wait_for(until_eof(), timeout)

    def close(self) -> None:
        self.writer.close()


class FakeGuest:
    """The chardev socket of one qube, with a scripted agent behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conns: asyncio.Queue[GuestEnd] = asyncio.Queue()
        self.ends: list[GuestEnd] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "FakeGuest":
        self.server = await asyncio.start_unix_server(self._accepted, str(self.path))
        return self

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        end = GuestEnd(reader, writer)
        self.ends.append(end)      # keep a reference: a collected writer closes the socket
        await self.conns.put(end)

    async def accept(self, timeout: float = 2.0) -> GuestEnd:
        return await asyncio.wait_for(self.conns.get(), timeout)

    def stop(self) -> None:
        for end in self.ends:
            end.close()
        if self.server is not None:
            self.server.close()


async def connect(link: AgentLink, guest: FakeGuest) -> GuestEnd:
    """Bring ``link`` up: the guest says HELLO, dom0 must answer with its own."""
    ready = asyncio.create_task(link.ensure_ready(5.0))
    end = await guest.accept()
    await end.hello()
    assert await end.recv() == (P.HELLO, 0, P.u32(P.VERSION))
    await ready
    assert link.state == LinkState.READY
    return end


async def setup(sock_dir: Path, name: str = "work") -> tuple[FakeGuest, AgentLink, GuestEnd]:
    guest = await FakeGuest(sock_dir / f"{name}.sock").start()
    link = AgentLink(name, str(guest.path))
    end = await connect(link, guest)
    return guest, link, end


async def open_exec(link: AgentLink, end: GuestEnd, command: str = "cat") -> agentlink.Call:
    call = await link.exec("user", command)
    assert await end.recv() == (P.EXEC, call.chan, b"user\0" + command.encode())
    return call


async def events_until_exit(call: agentlink.Call, timeout: float = 2.0) -> list[Any]:
    events = []
    while True:
        ev = await asyncio.wait_for(call.next_event(), timeout)
        events.append(ev)
        if ev[0] == "exit":
            return events


async def wait_until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def assert_failed_by_violation(events: list[Any]) -> None:
    """A call cut short by a violation ends with a readable error, then exit 255."""
    assert events[-1] == ("exit", 255)
    kind, message = events[-2]
    assert kind == "error"
    assert "protocol violation" in message
