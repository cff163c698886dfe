"""dom0's end of the agent link against a guest that keeps the protocol's letter but
tries to make dom0 spend without bound: control floods, tiny frames, a port it
stops reading.  Every such pattern has a bound that does not need its good will."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bulkhead import agentlink
from bulkhead.agentlink import AgentLinkError, LinkState
from bulkhead.guest import protocol as P
from bulkhead.ratelimit import QubeLogLimiter, TokenBucket
from fake_guest import (WINDOW, connect, events_until_exit, open_exec, run, setup, wait_until)
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use

HELLO = P.pack(P.HELLO, 0, P.u32(P.VERSION))


# --- rate limits as such ------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_its_refill_rate():
    clock = Clock()
    bucket = TokenBucket(3, 10.0, clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now = 9.9
    assert not bucket.take()
    clock.now = 10.0
    assert bucket.take() and not bucket.take()
    clock.now = 1000.0                      # never more than the burst, however long idle
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_qube_log_limiter_bounds_each_qube_and_says_what_it_held_back(caplog):
    clock = Clock()
    limiter = QubeLogLimiter(burst=5, refill_seconds=10.0, clock=clock)
    logger = logging.getLogger("test.ratelimit")
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        for i in range(1000):
            limiter.log(logger, "untrusted", logging.WARNING, "qube untrusted: line %d", i)
        limiter.log(logger, "work", logging.WARNING, "qube work: its own budget")
        assert limiter.suppressed("untrusted") == 995
        clock.now = 10.0
        limiter.log(logger, "untrusted", logging.WARNING, "qube untrusted: after the pause")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"qube untrusted: line {i}" for i in range(5)]
    assert "qube work: its own budget" in lines
    assert lines[-2].startswith("qube untrusted: 995 more log lines caused by this qube")
    assert lines[-1] == "qube untrusted: after the pause"
    assert limiter.suppressed("untrusted") == 0


# --- control floods -------------------------------------------------------------------

def test_hello_flood_is_a_violation_past_a_small_budget(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        await end.send_raw(HELLO * 10_000)
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        assert link.violations == 1
        # dom0 answered at most the budget's worth, not ten thousand replies.
        replies = 0
        try:
            while True:
                data = await asyncio.wait_for(end.reader.read(65536), 0.5)
                if not data:
                    break
                replies += len(data) // len(HELLO)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        assert replies <= agentlink.CONTROL_BURST
        guest.stop()
    run(scenario())


def test_a_flood_riding_on_the_first_hello_leaves_the_link_closed(sock_dir):
    """The HELLO that opens the link, with a flood behind it in the same read: the
    link must not be reported ready once the read loop has closed it."""
    async def scenario():
        guest, link, end = await setup(sock_dir)
        await end.send_raw(HELLO * 50)       # spends the control budget: link closed
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        ready = asyncio.create_task(link.ensure_ready(5.0))
        end2 = await guest.accept()
        await end2.send_raw(HELLO * 50)
        with pytest.raises(AgentLinkError):
            await ready
        assert link.state == LinkState.DISCONNECTED
        with pytest.raises(AgentLinkError):
            await link.exec("user", "true")
        guest.stop()
    run(scenario())


def test_reconnecting_backs_off_after_each_violation_in_a_row(sock_dir, monkeypatch):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        await end.send_raw(b"\xff" * 12)
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        # Within the back-off, a request with a short deadline is refused at once, saying why.
        with pytest.raises(AgentLinkError, match="broke the protocol 1 time"):
            await link.ensure_ready(0.2)
        end2 = await connect(link, guest)          # a longer deadline waits the pause out
        await end2.send_raw(b"\xff" * 12)
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        loop = asyncio.get_running_loop()
        assert link._retry_at - loop.time() > 1.5  # 2 s after the second in a row
        guest.stop()
    run(scenario())


def test_unsolicited_pongs_are_budgeted(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        for i in range(agentlink.CONTROL_BURST):
            await end.send(P.PONG, 0, b"late%d" % i)
        await asyncio.sleep(0.1)
        assert link.state == LinkState.READY
        await end.send(P.PONG, 0, b"one more")
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        guest.stop()
    run(scenario())


def test_empty_credit_is_a_violation(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send(P.CREDIT, call.chan, P.u32(0))
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        assert link.violations == 1
        guest.stop()
    run(scenario())


# --- memory ---------------------------------------------------------------------------

def test_tiny_frames_cost_their_payload_not_an_object_each(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send_raw(P.pack(P.STDOUT, call.chan, b"xy") * (WINDOW // 2))
        await wait_until(lambda: call.buffered == WINDOW, timeout=10)
        assert link.violations == 0
        # Taken in frame-sized chunks, with one CREDIT per chunk, not per tiny frame.
        kind, chunk = await call.next_event()
        assert kind == "stdout" and chunk == b"xy" * (P.MAX_PAYLOAD // 2)
        assert await end.recv() == (P.CREDIT, call.chan, P.u32(P.MAX_PAYLOAD))
        guest.stop()
    run(scenario())


def test_an_abandoned_call_holds_nothing_and_grants_no_credit(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send(P.STDOUT, call.chan, b"a" * 1000)
        await wait_until(lambda: call.buffered == 1000)
        call.abandon()
        assert call.buffered == 0
        await end.send(P.STDOUT, call.chan, b"b" * 1000)
        await end.nothing_for(0.2)                       # no credit for what nobody reads
        assert call.buffered == 0
        # Still within the credit it had: sending past it is a violation, as ever.
        rest = WINDOW - 2000 + 1
        await end.send_raw(b"".join(P.pack(P.STDOUT, call.chan, b"c" * min(P.MAX_PAYLOAD, rest - i))
                                    for i in range(0, rest, P.MAX_PAYLOAD)))
        await wait_until(lambda: link.state == LinkState.DISCONNECTED)
        guest.stop()
    run(scenario())


def test_exit_comes_after_all_buffered_output(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        await end.send(P.STDOUT, call.chan, b"out")
        await end.send(P.STDERR, call.chan, b"err")
        await end.send(P.EXIT, call.chan, P.i32(3))
        await wait_until(lambda: call.done)
        assert await events_until_exit(call) == [("stdout", b"out"), ("stderr", b"err"),
                                                 ("exit", 3)]
        guest.stop()
    run(scenario())


# --- a guest that stops reading -------------------------------------------------------

def test_a_send_the_guest_never_reads_ends_at_its_deadline(sock_dir, monkeypatch):
    monkeypatch.setattr(agentlink, "SEND_TIMEOUT", 0.5)

    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        end.writer.transport.pause_reading()          # the guest stops reading its port
        with pytest.raises(AgentLinkError, match="did not read its port"):
            for _ in range(10_000):                   # far more than any socket buffers
                await link.send(P.STDIN, call.chan, b"s" * P.MAX_PAYLOAD)
        assert link.state == LinkState.DISCONNECTED
        assert await events_until_exit(call) == [
            ("error", "qube 'work': link to the guest agent closed: "
                      "the guest did not read its port for 0 s"), ("exit", 255)]
        guest.stop()
    run(scenario())


def test_a_send_with_its_own_deadline_fails_without_closing_the_link(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        end.writer.transport.pause_reading()
        with pytest.raises(AgentLinkError):
            for _ in range(10_000):
                await link.send(P.STDIN, call.chan, b"s" * P.MAX_PAYLOAD, timeout=0.3)
        assert link.state == LinkState.READY   # the caller's own deadline, not a verdict
        guest.stop()
    run(scenario())
