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
import time
import pytest
from bulkhead.agentlink import AgentLink, AgentLinkError, LinkState
from bulkhead.guest import protocol as P
from fake_guest import (
    WINDOW,
    run,
    FakeGuest,
    connect,
    setup,
    open_exec,
    events_until_exit,
    wait_until,
    assert_failed_by_violation,
)
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use


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
        await wait_until(lambda: call.buffered == WINDOW)
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
