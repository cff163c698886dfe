"""dom0's end of the agent link against a guest that breaks the protocol: every
violation closes the link, fails the calls in progress and is counted."""

from __future__ import annotations

import asyncio
import time
import pytest
from bulkhead import agentlink
from bulkhead.agentlink import LinkState
from bulkhead.guest import protocol as P
from fake_guest import (
    WINDOW,
    run,
    header,
    GuestEnd,
    setup,
    open_exec,
    events_until_exit,
    wait_until,
    assert_failed_by_violation,
)
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use


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
        held = call.buffered + sum(len(value) for _, value in call._tail
                                   if isinstance(value, (bytes, str)))
        # Protocol: ERROR means "the call could not start; an EXIT follows" -- one per call.
        # Whatever the fix, what dom0 holds for one call must stay within the window.
        assert held <= WINDOW
        guest.stop()
    run(scenario())
