from __future__ import annotations

from typing import Any

import pytest

from bulkhead.errors import (BackendError, QubesVMError, QubesVMInUseError,
                             QubesVMNotPausedError, QubesVMNotRunningError,
                             QubesVMNotStartedError)


def _recorder(app: Any) -> list[tuple[str, str, dict[str, str]]]:
    events: list[tuple[str, str, dict[str, str]]] = []
    app.add_observer(lambda s, e, k: events.append(
        ("" if s is app else s.name, e, {a: str(b) for a, b in k.items()})))
    return events


def test_start_starts_the_netvm_chain_first(system: Any, arun: Any) -> None:
    events = _recorder(system)
    work = system.domains["work"]
    arun(work.start())
    assert [(name, e) for name, e, _ in events if e in ("domain-pre-start", "domain-start")] == [
        ("sys-net", "domain-pre-start"), ("sys-net", "domain-start"),
        ("sys-firewall", "domain-pre-start"), ("sys-firewall", "domain-start"),
        ("work", "domain-pre-start"), ("work", "domain-start")]
    assert [vm.name for vm in system.domains if vm.is_running()] == [
        "dom0", "sys-firewall", "sys-net", "work"]
    calls = len(system.lifecycle.calls)
    arun(work.start())  # already running: nothing to do, not an error
    assert len(system.lifecycle.calls) == calls
    vault = system.domains["vault"]
    arun(vault.start())
    assert system.domains["vault"].get_power_state() == "Running"


def test_shutdown_kill_and_domain_stopped(system: Any, arun: Any) -> None:
    work, fw = system.domains["work"], system.domains["sys-firewall"]
    arun(work.start())
    events = _recorder(system)
    with pytest.raises(QubesVMInUseError, match="work"):
        arun(fw.shutdown())  # work still uses it
    assert fw.is_running()
    arun(work.shutdown(wait=True))
    assert work.is_halted()
    assert [e for n, e, _ in events if n == "work"] == [
        "domain-pre-shutdown", "domain-shutdown", "domain-stopped"]
    assert events[0][2] == {"force": "False"}
    assert events[1][2] == {"reason": "shutdown"}
    with pytest.raises(QubesVMNotStartedError):
        arun(work.shutdown())
    with pytest.raises(QubesVMNotStartedError):
        arun(work.kill())
    arun(work.start())
    arun(fw.shutdown(force=True))  # forced: allowed with clients
    events.clear()
    arun(work.kill())
    assert [(n, e, k) for n, e, k in events] == [
        ("work", "domain-shutdown", {"reason": "killed"}),
        ("work", "domain-stopped", {"reason": "killed"})]


def test_machine_going_away_on_its_own(system: Any, arun: Any) -> None:
    work = system.domains["work"]
    arun(work.start())
    events = _recorder(system)
    system.lifecycle.crash(work)
    assert work.get_power_state() == "Halted"
    assert ("work", "domain-shutdown", {"reason": "crashed"}) in events


def test_pause_unpause(system: Any, arun: Any) -> None:
    work = system.domains["work"]
    with pytest.raises(QubesVMNotRunningError):
        arun(work.pause())
    arun(work.start())
    events = _recorder(system)
    arun(work.pause())
    assert work.get_power_state() == "Paused" and work.is_paused()
    with pytest.raises(QubesVMNotRunningError):
        arun(work.pause())
    arun(work.unpause())
    with pytest.raises(QubesVMNotPausedError):
        arun(work.unpause())
    assert [e for _, e, _ in events] == ["domain-pre-paused", "domain-paused",
                                         "domain-pre-unpaused", "domain-unpaused"]


def test_start_failure(system: Any, arun: Any) -> None:
    vault = system.domains["vault"]
    system.lifecycle.fail_start.add("vault")
    events = _recorder(system)
    with pytest.raises(BackendError, match="injected start failure"):
        arun(vault.start())
    assert vault.is_halted()
    assert [e for _, e, _ in events] == ["domain-pre-start", "domain-start-failed"]


def test_pre_start_handler_may_veto(system: Any, arun: Any) -> None:
    vault = system.domains["vault"]

    def veto(subject: Any, event: str, **kwargs: Any) -> None:
        raise QubesVMError(subject, "not today")

    vault.add_handler("domain-pre-start", veto)
    with pytest.raises(QubesVMError, match="not today"):
        arun(vault.start())
    assert ("start", "vault") not in system.lifecycle.calls


def test_netvm_switch_of_running_qube(system: Any, arun: Any) -> None:
    work, net = system.domains["work"], system.domains["sys-net"]
    sys_net2 = arun(system.create_vm("AppVM", name="sys-net2", label="red"))
    sys_net2.provides_network = True
    sys_net2.netvm = None
    arun(work.start())
    with pytest.raises(QubesVMNotStartedError, match="stopped NetVM"):
        work.netvm = sys_net2
    with pytest.raises(QubesVMNotStartedError):
        system.default_netvm = sys_net2  # would move work (running) to a halted netvm
    work.netvm = net  # running: fine
    work.netvm = None
    assert work.netvm is None


def test_adminvm_has_no_machine(system: Any, arun: Any) -> None:
    dom0 = system.domains["dom0"]
    for op in (dom0.start, dom0.shutdown, dom0.kill, dom0.pause, dom0.unpause):
        with pytest.raises(QubesVMError):
            arun(op())
    state = dom0.current_state()
    assert state["power_state"] == "Running" and state["mem_static_max"] >= state["mem"]


def test_concurrent_starts_start_once(system: Any, arun: Any) -> None:
    import asyncio
    vault = system.domains["vault"]
    system.lifecycle.start_delay = 0.05

    async def both() -> None:
        await asyncio.gather(vault.start(), vault.start(), vault.start())

    arun(both())
    assert system.lifecycle.calls.count(("start", "vault")) == 1
    assert vault.is_running()
