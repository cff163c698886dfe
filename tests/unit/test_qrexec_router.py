"""Routing a qrexec call between two qubes' agent links (fake guests), under a policy
stub: the caller's identity comes from its link, refusals end with 126, the two
calls are joined with end-of-file and exit code, and a caller that goes away
hangs the service up."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Any

from bulkhead.agentlink import AgentLink, REFUSED
from bulkhead.guest import protocol as P
from bulkhead.qrexec import router as router_mod
from bulkhead.qrexec.router import Router
from fake_guest import FakeGuest, connect, run
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use

CHAN = P.GUEST_CHANNEL | 1


@dataclass(frozen=True)
class StubDecision:
    action: str
    target: str
    user: str | None = None
    autostart: bool = True
    ask_targets: list[str] = field(default_factory=list)
    default_target: str | None = None
    origin: str = "stub:1"
    notify: bool = False
    line: str = "a stub rule"
    reason: str = "the stub says so"


class StubPolicy:
    def __init__(self, action: str) -> None:
        self.action = action
        self.asked: list[tuple[str, str, str, str]] = []

    def evaluate(self, service: str, argument: str, source: str, target: str,
                 system: Any) -> StubDecision:
        self.asked.append((service, argument, source, target))
        return StubDecision(self.action, target)


class StubVM:
    def __init__(self, name: str, link: AgentLink) -> None:
        self.name = name
        self.link = link
        self.qid = 7

    def is_running(self) -> bool:
        return True


class StubApp:
    paths = None

    def __init__(self, vms: dict[str, StubVM]) -> None:
        self.domains = vms
        self.lifecycle = self

    async def agent(self, vm: StubVM) -> AgentLink:
        return vm.link


async def two_qubes(sock_dir, action: str) -> tuple[Any, ...]:
    src_guest = await FakeGuest(sock_dir / "work.sock").start()
    dst_guest = await FakeGuest(sock_dir / "personal.sock").start()
    dst_link = AgentLink("personal", str(dst_guest.path))
    dst = await connect(dst_link, dst_guest)
    policy = StubPolicy(action)
    app = StubApp({"personal": StubVM("personal", dst_link)})
    rt = Router(app, policy)
    src_link = AgentLink("work", str(src_guest.path), on_call=rt.route)
    src = await connect(src_link, src_guest)
    return src, dst, policy, (src_guest, dst_guest)


def _patch_system_info(monkeypatch):
    import bulkhead.qrexec.policy as policy

    monkeypatch.setattr(policy, "system_info", lambda app: {})


def test_an_allowed_call_is_joined_both_ways(sock_dir, monkeypatch):
    _patch_system_info(monkeypatch)

    async def scenario():
        src, dst, policy, guests = await two_qubes(sock_dir, "allow")
        await src.send(P.CALL, CHAN, b"personal\0my.Service+arg")
        mtype, chan, payload = await dst.recv()
        # The source is who the link says, whatever the request could have claimed.
        assert (mtype, payload) == (P.SERVICE, b"user\0my.Service+arg\0work")
        assert policy.asked == [("my.Service", "arg", "work", "personal")]
        await src.send(P.STDIN, CHAN, b"question")
        await src.send(P.STDIN, CHAN, b"")
        assert await dst.recv() == (P.STDIN, chan, b"question")
        assert await dst.recv() == (P.STDIN, chan, b"")
        await dst.send(P.STDOUT, chan, b"answer")
        await dst.send(P.EXIT, chan, P.i32(3))
        frames = [await src.recv() for _ in range(2)]
        assert (P.CREDIT, CHAN, P.u32(8)) in frames          # the service took our input
        assert (P.STDOUT, CHAN, b"answer") in frames
        assert [await src.recv() for _ in range(3)] == [
            (P.STDOUT, CHAN, b""), (P.STDERR, CHAN, b""), (P.EXIT, CHAN, P.i32(3))]
        for g in guests:
            g.stop()
    run(scenario())


def test_a_denied_call_ends_with_126_and_reaches_nobody(sock_dir, monkeypatch):
    _patch_system_info(monkeypatch)

    async def scenario():
        src, dst, policy, guests = await two_qubes(sock_dir, "deny")
        await src.send(P.CALL, CHAN, b"personal\0qubes.VMShell")
        mtype, chan, payload = await src.recv()
        assert (mtype, chan) == (P.ERROR, CHAN) and payload.startswith(b"Request refused")
        assert [await src.recv() for _ in range(3)] == [
            (P.STDOUT, CHAN, b""), (P.STDERR, CHAN, b""), (P.EXIT, CHAN, P.i32(REFUSED))]
        await dst.nothing_for(0.2)
        for g in guests:
            g.stop()
    run(scenario())


def test_a_caller_that_goes_away_hangs_the_service_up(sock_dir, monkeypatch):
    _patch_system_info(monkeypatch)
    monkeypatch.setattr(router_mod, "HANGUP_GRACE", 0.2)

    async def scenario():
        src, dst, policy, guests = await two_qubes(sock_dir, "allow")
        await src.send(P.CALL, CHAN, b"personal\0my.Service")
        mtype, chan, _ = await dst.recv()
        assert mtype == P.SERVICE
        src.close()                                  # the caller's qube drops its link
        assert await dst.recv() == (P.SIGNAL, chan, P.u32(signal.SIGHUP))
        assert await dst.recv() == (P.STDIN, chan, b"")
        assert await dst.recv() == (P.SIGNAL, chan, P.u32(signal.SIGKILL))
        for g in guests:
            g.stop()
    run(scenario())


def test_a_call_flood_is_refused_past_the_budget(sock_dir, monkeypatch):
    _patch_system_info(monkeypatch)

    async def scenario():
        src, dst, policy, guests = await two_qubes(sock_dir, "deny")
        from bulkhead import agentlink
        n = agentlink.CALL_BURST + 10
        await src.send_raw(b"".join(P.pack(P.CALL, P.GUEST_CHANNEL | (i + 1), b"personal\0x.Y")
                                    for i in range(n)))
        await asyncio.sleep(0.5)
        assert len(policy.asked) <= agentlink.CALL_BURST + 1   # the rest never cost a decision
        for g in guests:
            g.stop()
    run(scenario())
