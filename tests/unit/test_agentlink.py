"""dom0's end of the guest-agent link (bulkhead.agentlink), against a fake, scriptable guest.

The fake guest is a unix-socket server playing QEMU's virtio-serial chardev: the
link connects to it exactly as it connects to a real qube.  The guest is hostile
by design, so most tests here make it misbehave and check that the link closes,
fails what was in flight, counts the violation, buffers nothing without bound,
and can be used again afterwards.

Everything the fake guest receives is parsed with FrameReader(FROM_DOM0), so a
frame dom0 should never send fails the test too.
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
from bulkhead.agentlink import AgentLink, AgentLinkError, LinkState
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


# --- connecting ---------------------------------------------------------------------

def test_ensure_ready_after_hello_and_dom0_answers(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        assert link.violations == 0
        # Already ready: returns at once, no new connection.
        await link.ensure_ready(0.1)
        assert guest.conns.empty()
        guest.stop()
    run(scenario())


def test_ensure_ready_waits_for_the_socket_to_appear(sock_dir):
    # QEMU creates the chardev socket a moment after it starts; the link retries.
    async def scenario():
        link = AgentLink("work", str(sock_dir / "late.sock"))
        ready = asyncio.create_task(link.ensure_ready(3.0))
        await asyncio.sleep(0.1)
        assert not ready.done()
        guest = await FakeGuest(sock_dir / "late.sock").start()
        end = await guest.accept()
        await end.hello()
        assert await end.recv() == (P.HELLO, 0, P.u32(P.VERSION))
        await ready
        assert link.state == LinkState.READY
        guest.stop()
    run(scenario())


def test_no_hello_times_out_cleanly(sock_dir):
    async def scenario():
        guest = await FakeGuest(sock_dir / "mute.sock").start()
        link = AgentLink("work", str(guest.path))
        start = time.monotonic()
        with pytest.raises(AgentLinkError, match="did not answer"):
            await link.ensure_ready(0.3)
        assert 0.25 <= time.monotonic() - start < 2.0
        assert link.state == LinkState.DISCONNECTED
        end = await guest.accept()
        await end.expect_closed()        # dom0 let go of the connection
        assert link.violations == 0      # silence is not a violation
        guest.stop()
    run(scenario())


def test_no_socket_times_out_cleanly(sock_dir):
    async def scenario():
        link = AgentLink("work", str(sock_dir / "absent.sock"))
        with pytest.raises(AgentLinkError):
            await link.ensure_ready(0.2)
        assert link.state == LinkState.DISCONNECTED
    run(scenario())


def test_guest_hanging_up_before_hello_fails_at_once(sock_dir):
    async def scenario():
        guest = await FakeGuest(sock_dir / "g.sock").start()
        link = AgentLink("work", str(guest.path))
        ready = asyncio.create_task(link.ensure_ready(10.0))
        end = await guest.accept()
        end.close()
        start = time.monotonic()
        with pytest.raises(AgentLinkError):
            await ready
        assert time.monotonic() - start < 2.0, "must not wait out the whole timeout"
        guest.stop()
    run(scenario())


def test_wrong_version_closes(sock_dir):
    async def scenario():
        guest = await FakeGuest(sock_dir / "g.sock").start()
        link = AgentLink("work", str(guest.path))
        ready = asyncio.create_task(link.ensure_ready(5.0))
        end = await guest.accept()
        await end.hello(P.VERSION + 1)
        with pytest.raises(AgentLinkError, match="version"):
            await ready
        assert link.state == LinkState.DISCONNECTED
        assert link.violations == 1
        # dom0 must not have answered HELLO: it closed without a word.
        assert await end.reader.read(65536) == b""
        guest.stop()
    run(scenario())


def test_anything_before_hello_is_a_violation(sock_dir):
    async def scenario():
        guest = await FakeGuest(sock_dir / "g.sock").start()
        link = AgentLink("work", str(guest.path))
        ready = asyncio.create_task(link.ensure_ready(5.0))
        end = await guest.accept()
        await end.send(P.PONG, 0, b"x")
        with pytest.raises(AgentLinkError, match="before HELLO"):
            await ready
        assert link.violations == 1
        guest.stop()
    run(scenario())


# --- calls ------------------------------------------------------------------------------

def test_exec_streams_output_in_order_and_returns_credit(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end, "echo hi; echo oops >&2")
        assert call.chan != 0

        await end.send(P.STDOUT, call.chan, b"a" * 1000)
        assert await call.next_event() == ("stdout", b"a" * 1000)
        # Consuming the output hands exactly that much credit back to the guest.
        assert await end.recv() == (P.CREDIT, call.chan, P.u32(1000))

        await end.send(P.STDERR, call.chan, b"oops\n")
        assert await call.next_event() == ("stderr", b"oops\n")
        assert await end.recv() == (P.CREDIT, call.chan, P.u32(5))

        await end.send(P.STDOUT, call.chan, b"more")
        await end.send(P.STDOUT, call.chan, b"")      # end of stdout: no event of its own
        await end.send(P.STDERR, call.chan, b"")
        await end.send(P.EXIT, call.chan, P.i32(3))
        assert await events_until_exit(call) == [("stdout", b"more"), ("exit", 3)]
        assert call.done and call.exit_code == 3
        assert call.chan not in link.calls
        assert link.violations == 0 and link.state == LinkState.READY
        guest.stop()
    run(scenario())


def test_error_from_guest_is_shown_without_control_characters(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        # A qube could try to drive dom0's terminal with escape sequences.
        await end.send(P.ERROR, call.chan, b"no such user\x1b[2J\x07")
        await end.send(P.EXIT, call.chan, P.i32(127))
        events = await events_until_exit(call)
        assert events == [("error", "no such user?[2J?"), ("exit", 127)]
        assert link.violations == 0
        guest.stop()
    run(scenario())


def test_channels_are_distinct_and_never_zero(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        calls = [await open_exec(link, end, f"c{i}") for i in range(5)]
        chans = [c.chan for c in calls]
        assert len(set(chans)) == 5 and 0 not in chans
        guest.stop()
    run(scenario())


def test_service_call_frame(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await link.service("user", "qubes.Filecopy+arg", "work")
        assert await end.recv() == (P.SERVICE, call.chan, b"user\0qubes.Filecopy+arg\0work")
        with pytest.raises(AgentLinkError):
            await link.service("user", "../../bin/sh", "work")
        with pytest.raises(AgentLinkError):
            await link.exec("u" * (P.MAX_USER + 1), "true")
        with pytest.raises(AgentLinkError):
            await link.exec("user", "x" * (P.MAX_COMMAND + 1))
        # None of the refused calls put anything on the wire.
        await end.nothing_for(0.1)
        guest.stop()
    run(scenario())


def test_signal_and_close_stdin_frames(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await call.signal(15)
        assert await end.recv() == (P.SIGNAL, call.chan, P.u32(15))
        await call.close_stdin()
        assert await end.recv() == (P.STDIN, call.chan, b"")
        guest.stop()
    run(scenario())


def test_guest_may_fill_exactly_the_window_then_more_once_credited(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        chunk = b"z" * P.MAX_PAYLOAD
        for _ in range(WINDOW // P.MAX_PAYLOAD):
            await end.send(P.STDOUT, call.chan, chunk)
        # The whole window in flight, nothing consumed: still within the rules.
        await wait_until(lambda: call.events.qsize() == WINDOW // P.MAX_PAYLOAD)
        assert link.violations == 0
        assert await call.next_event() == ("stdout", chunk)
        assert await end.recv() == (P.CREDIT, call.chan, P.u32(len(chunk)))
        # That credit lets the guest send one more chunk.
        await end.send(P.STDOUT, call.chan, chunk)
        await end.send(P.EXIT, call.chan, P.i32(0))
        events = await events_until_exit(call)
        assert events[-1] == ("exit", 0) and len(events) == WINDOW // P.MAX_PAYLOAD + 1
        assert link.violations == 0
        guest.stop()
    run(scenario())


def test_stdin_respects_the_credit_window(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        data = bytes(range(256)) * (WINDOW // 256 + 40)     # WINDOW + 10 KiB
        writer = asyncio.create_task(call.write(data))

        received = b""
        while len(received) < WINDOW:
            mtype, chan, payload = await end.recv()
            assert (mtype, chan) == (P.STDIN, call.chan)
            assert 0 < len(payload) <= P.MAX_PAYLOAD
            received += payload
        assert len(received) == WINDOW
        # The guest has not credited anything: dom0 must stop and wait.
        await end.nothing_for(0.2)
        assert not writer.done()

        await end.send(P.CREDIT, call.chan, P.u32(1000))
        mtype, chan, payload = await end.recv()
        assert (mtype, chan, len(payload)) == (P.STDIN, call.chan, 1000)
        received += payload
        await end.nothing_for(0.1)
        assert not writer.done()

        await end.send(P.CREDIT, call.chan, P.u32(WINDOW))
        while len(received) < len(data):
            received += (await end.recv())[2]
        await asyncio.wait_for(writer, 2.0)
        assert received == data
        assert link.violations == 0
        guest.stop()
    run(scenario())


def test_blocked_writer_is_released_when_the_link_fails(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        writer = asyncio.create_task(call.write(b"x" * (WINDOW + 1)))
        await wait_until(lambda: call.send_credit == 0)
        await end.send_raw(b"\xff" * 12)
        await asyncio.wait_for(writer, 2.0)      # returns instead of waiting forever
        assert_failed_by_violation(await events_until_exit(call))
        guest.stop()
    run(scenario())


def test_ping_gets_pong(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        pinger = asyncio.create_task(link.ping(timeout=2.0))
        mtype, chan, nonce = await end.recv()
        assert (mtype, chan) == (P.PING, 0) and 0 < len(nonce) <= 64
        await end.send(P.PONG, 0, b"not-the-nonce")   # stale or forged: ignored
        await asyncio.sleep(0.05)
        assert not pinger.done()
        await end.send(P.PONG, 0, nonce)
        rtt = await pinger
        assert 0.0 <= rtt < 2.0
        assert link.violations == 0
        guest.stop()
    run(scenario())


# --- violations ------------------------------------------------------------------------

async def _garbage(end: GuestEnd, chan: int) -> None:
    await end.send_raw(b"GET / HTTP/1.1\r\nHost: dom0\r\n\r\n")


async def _unknown_type(end: GuestEnd, chan: int) -> None:
    await end.send_raw(header(99, chan, 0))


async def _dom0_only_type(end: GuestEnd, chan: int) -> None:
    await end.send_raw(P.pack(P.EXEC, chan, b"root\0reboot"))


async def _nonzero_flags(end: GuestEnd, chan: int) -> None:
    await end.send_raw(header(P.STDOUT, chan, 1, flags=1) + b"x")


async def _huge_length(end: GuestEnd, chan: int) -> None:
    await end.send_raw(header(P.STDOUT, chan, 0xFFFFFFFF))


async def _exit_over_its_limit(end: GuestEnd, chan: int) -> None:
    await end.send_raw(header(P.EXIT, chan, 8) + b"\0" * 8)


async def _exit_too_short(end: GuestEnd, chan: int) -> None:
    await end.send(P.EXIT, chan, b"\0\0")


async def _credit_too_short(end: GuestEnd, chan: int) -> None:
    await end.send(P.CREDIT, chan, b"\1")


async def _error_on_control_channel(end: GuestEnd, chan: int) -> None:
    await end.send(P.ERROR, 0, b"boo")


async def _hello_on_a_call_channel(end: GuestEnd, chan: int) -> None:
    await end.send_raw(header(P.HELLO, chan, 4) + P.u32(P.VERSION))


async def _output_for_unopened_channel(end: GuestEnd, chan: int) -> None:
    await end.send(P.STDOUT, chan + 100, b"hi")


async def _exit_for_unopened_channel(end: GuestEnd, chan: int) -> None:
    await end.send(P.EXIT, chan + 100, P.i32(0))


async def _output_after_end(end: GuestEnd, chan: int) -> None:
    await end.send(P.STDERR, chan, b"")
    await end.send(P.STDERR, chan, b"late")


async def _more_than_credit(end: GuestEnd, chan: int) -> None:
    for _ in range(WINDOW // P.MAX_PAYLOAD):
        await end.send(P.STDOUT, chan, b"o" * P.MAX_PAYLOAD)
    await end.send(P.STDOUT, chan, b"!")


async def _exit_negative(end: GuestEnd, chan: int) -> None:
    await end.send(P.EXIT, chan, P.i32(-1))


async def _exit_too_big(end: GuestEnd, chan: int) -> None:
    await end.send(P.EXIT, chan, P.i32(256))


async def _credit_never_owed(end: GuestEnd, chan: int) -> None:
    # dom0 has sent no stdin: the guest cannot have consumed any.
    await end.send(P.CREDIT, chan, P.u32(1))


VIOLATIONS = {
    "garbage": _garbage,
    "unknown type": _unknown_type,
    "dom0-only type": _dom0_only_type,
    "nonzero flags": _nonzero_flags,
    "length 0xFFFFFFFF": _huge_length,
    "EXIT over its size limit": _exit_over_its_limit,
    "EXIT payload too short": _exit_too_short,
    "CREDIT payload too short": _credit_too_short,
    "ERROR on channel 0": _error_on_control_channel,
    "HELLO on a call channel": _hello_on_a_call_channel,
    "output for a channel never opened": _output_for_unopened_channel,
    "EXIT for a channel never opened": _exit_for_unopened_channel,
    "output after its stream ended": _output_after_end,
    "more output than the credit": _more_than_credit,
    "EXIT code -1": _exit_negative,
    "EXIT code 256": _exit_too_big,
    "CREDIT never owed": _credit_never_owed,
}


@pytest.mark.parametrize("misbehave", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_violation_closes_link_and_fails_calls(sock_dir, misbehave):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        other = await open_exec(link, end, "sleep 100")
        await misbehave(end, call.chan)
        # Wait for the verdict before consuming anything: consuming output sends credit,
        # which would change what counts as "more than the credit".
        await wait_until(lambda: link.violations > 0)
        assert link.violations == 1
        assert link.state == LinkState.DISCONNECTED
        assert link.calls == {}
        assert_failed_by_violation(await events_until_exit(call))
        assert_failed_by_violation(await events_until_exit(other))
        await end.expect_closed()
        guest.stop()
    run(scenario())


def test_output_after_exit_is_a_violation(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        finished = await open_exec(link, end, "true")
        running = await open_exec(link, end, "sleep 100")
        await end.send(P.EXIT, finished.chan, P.i32(0))
        assert await events_until_exit(finished) == [("exit", 0)]
        await end.send(P.STDOUT, finished.chan, b"zombie output")
        assert_failed_by_violation(await events_until_exit(running))
        assert link.violations == 1
        guest.stop()
    run(scenario())


def test_oversized_length_is_refused_from_the_header_alone(sock_dir, monkeypatch):
    # The frame timeout is long here, so only the header check can end the link quickly.
    monkeypatch.setattr(agentlink, "FRAME_TIMEOUT", 60.0)

    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        start = time.monotonic()
        await end.send_raw(header(P.STDOUT, call.chan, 0xFFFFFFFF))   # 12 bytes, no payload
        await wait_until(lambda: link.violations == 1, timeout=1.0)
        assert time.monotonic() - start < 1.0
        assert_failed_by_violation(await events_until_exit(call))
        # dom0 hung up rather than waiting to buffer 4 GiB: the guest's flood goes nowhere.
        await end.expect_closed()
        with pytest.raises(ConnectionError):
            for _ in range(256):                      # up to 16 MiB
                await end.send_raw(b"\0" * 65536)
        guest.stop()
    run(scenario())


def test_frame_not_completed_in_time_is_a_violation(sock_dir, monkeypatch):
    monkeypatch.setattr(agentlink, "FRAME_TIMEOUT", 0.2)

    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        # An idle link is fine however long it is idle; only a half-sent frame is timed.
        await asyncio.sleep(0.4)
        assert link.violations == 0
        start = time.monotonic()
        await end.send_raw(header(P.STDOUT, call.chan, 10) + b"12345")
        await wait_until(lambda: link.violations == 1)
        assert 0.15 <= time.monotonic() - start < 1.5
        assert_failed_by_violation(await events_until_exit(call))
        await end.expect_closed()
        guest.stop()
    run(scenario())


def test_frame_dripped_slowly_is_still_bounded_by_frame_timeout(sock_dir, monkeypatch):
    monkeypatch.setattr(agentlink, "FRAME_TIMEOUT", 0.5)

    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send_raw(header(P.STDOUT, call.chan, 100))
        # One byte every 50 ms: each read is quick, but after 1.5 s (3x FRAME_TIMEOUT)
        # the frame is still only 30 bytes in.
        for _ in range(30):
            await asyncio.sleep(0.05)
            if link.violations:
                break
            await end.send_raw(b"d")
        assert link.violations == 1
        guest.stop()
    run(scenario())


def test_eof_in_the_middle_of_a_frame_is_a_violation(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send_raw(header(P.STDOUT, call.chan, 10) + b"123")
        end.writer.write_eof()
        await wait_until(lambda: link.violations == 1)
        assert_failed_by_violation(await events_until_exit(call))
        assert link.state == LinkState.DISCONNECTED
        guest.stop()
    run(scenario())


def test_clean_eof_fails_calls_but_is_no_violation(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        end.close()
        events = await events_until_exit(call)
        assert events[-1] == ("exit", 255)
        assert events[-2][0] == "error" and "closed" in events[-2][1]
        assert link.violations == 0
        assert link.state == LinkState.DISCONNECTED
        guest.stop()
    run(scenario())


def test_error_frames_cannot_make_dom0_buffer_without_bound(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        message = b"E" * 1000
        try:
            for _ in range(2 * WINDOW // len(message)):      # ~512 KB of ERROR frames
                await end.send(P.ERROR, call.chan, message)
            await end.send(P.PONG, 0, b"marker")
        except ConnectionError:
            pass                                              # dom0 hung up: fine
        await asyncio.sleep(0.2)
        held = 0
        while not call.events.empty():
            kind, value = call.events.get_nowait()
            held += len(value) if isinstance(value, (bytes, str)) else 0
        # Protocol: ERROR means "the call could not start; an EXIT follows" -- one per call.
        # Whatever the fix, what dom0 holds for one call must stay within the window.
        assert held <= WINDOW
        guest.stop()
    run(scenario())


# --- restart, reconnect, independence ----------------------------------------------------

def test_second_hello_means_agent_restarted(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.hello()
        # dom0 greets the new agent ...
        assert await end.recv() == (P.HELLO, 0, P.u32(P.VERSION))
        # ... and the calls of the old one fail: their processes are gone.
        events = await events_until_exit(call)
        assert events[-1] == ("exit", 255)
        assert events[-2][0] == "error" and "restarted" in events[-2][1]
        assert link.calls == {}
        assert link.violations == 0
        assert link.state == LinkState.READY
        # The same connection carries new calls.
        again = await open_exec(link, end, "true")
        await end.send(P.STDOUT, again.chan, b"ok")
        await end.send(P.EXIT, again.chan, P.i32(0))
        assert await events_until_exit(again) == [("stdout", b"ok"), ("exit", 0)]
        guest.stop()
    run(scenario())


def test_second_hello_with_another_version_closes(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        await end.hello(P.VERSION + 1)
        await asyncio.sleep(0.1)
        assert link.violations == 1
        assert link.state == LinkState.DISCONNECTED
        guest.stop()
    run(scenario())


def test_reconnect_after_violation(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        await end.send_raw(b"\x00" * 3 + b"\xff" * 9)     # garbage
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        with pytest.raises(AgentLinkError):
            await link.exec("user", "true")                # no link: refused, not hung
        # The next ensure_ready connects afresh; the agent says HELLO again.
        end2 = await connect(link, guest)
        call = await open_exec(link, end2, "true")
        await end2.send(P.STDOUT, call.chan, b"back")
        await end2.send(P.EXIT, call.chan, P.i32(7))
        assert await events_until_exit(call) == [("stdout", b"back"), ("exit", 7)]
        assert link.violations == 1
        guest.stop()
    run(scenario())


def test_two_links_are_independent(sock_dir):
    async def scenario():
        guest_a, link_a, end_a = await setup(sock_dir, "a")
        guest_b, link_b, end_b = await setup(sock_dir, "b")
        call_a = await open_exec(link_a, end_a)
        call_b = await open_exec(link_b, end_b)
        await end_b.send(P.STDOUT, call_b.chan, b"first")
        await end_a.send_raw(b"\xde\xad\xbe\xef" * 8)      # qube a turns hostile
        await wait_until(lambda: link_a.violations == 1)
        assert_failed_by_violation(await events_until_exit(call_a))
        # qube b's call carries on untouched.
        assert await call_b.next_event() == ("stdout", b"first")
        assert await end_b.recv() == (P.CREDIT, call_b.chan, P.u32(5))
        await end_b.send(P.STDOUT, call_b.chan, b"second")
        await end_b.send(P.EXIT, call_b.chan, P.i32(0))
        assert await events_until_exit(call_b) == [("stdout", b"second"), ("exit", 0)]
        assert link_b.violations == 0 and link_b.state == LinkState.READY
        guest_a.stop()
        guest_b.stop()
    run(scenario())


def test_failed_send_does_not_leak_a_call(sock_dir):
    async def scenario():
        link = AgentLink("work", str(sock_dir / "never.sock"))
        with pytest.raises(AgentLinkError):
            await link.exec("user", "true")
        with pytest.raises(AgentLinkError):
            await link.service("user", "qubes.Filecopy", "dom0")
        assert link.calls == {}
    run(scenario())


def test_ping_in_progress_fails_promptly_when_the_link_closes(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        pinger = asyncio.create_task(link.ping(timeout=5.0))
        assert (await end.recv())[0] == P.PING
        await end.send_raw(b"\xff" * 12)
        done, _ = await asyncio.wait([pinger], timeout=1.0)
        assert pinger in done, "ping still waiting although the link is closed"
        assert isinstance(pinger.exception(), AgentLinkError)
        guest.stop()
    run(scenario())
