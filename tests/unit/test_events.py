from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bulkhead.events import Emitter, event_matches, handler


class Base(Emitter):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.forwarded: list[tuple[str, bool]] = []

    @handler("property-set:netvm")
    def on_netvm(self, event: str, **kwargs: Any) -> None:
        self.seen.append(("base-netvm", event, kwargs))

    @handler("property-set:*")
    def on_any_property(self, event: str, **kwargs: Any) -> None:
        self.seen.append(("base-any", event, kwargs))

    @handler("veto")
    def on_veto(self, event: str, **kwargs: Any) -> None:
        raise ValueError("vetoed")

    def _forward_event(self, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        self.forwarded.append((event, pre_event))


class Derived(Base):
    @handler("property-set:netvm")
    def on_netvm(self, event: str, **kwargs: Any) -> None:  # replaces Base.on_netvm
        self.seen.append(("derived-netvm", event, kwargs))

    @handler("answer")
    def on_answer(self, event: str, **kwargs: Any) -> int:
        return 42


def test_wildcards() -> None:
    assert event_matches("*", "anything")
    assert event_matches("property-set:*", "property-set:netvm")
    assert not event_matches("property-set:*", "property-reset:netvm")
    assert not event_matches("property-set:netvm", "property-set:netvm2")


def test_class_handlers_and_wildcard() -> None:
    obj = Base()
    obj.fire_event("property-set:netvm", name="netvm", newvalue=1)
    assert [who for who, _, _ in obj.seen] == ["base-netvm", "base-any"]
    assert obj.seen[0][2] == {"name": "netvm", "newvalue": 1}
    obj.seen.clear()
    obj.fire_event("property-set:memory")
    assert [who for who, _, _ in obj.seen] == ["base-any"]


def test_subclass_replaces_handler_of_same_name() -> None:
    obj = Derived()
    obj.fire_event("property-set:netvm")
    assert [who for who, _, _ in obj.seen] == ["derived-netvm", "base-any"]


def test_instance_handlers_and_results() -> None:
    obj = Derived()
    calls = []

    def on_star(subject: Any, event: str, **kwargs: Any) -> str:
        calls.append((subject, event, kwargs))
        return "x"

    obj.add_handler("*", on_star)
    obj.add_handler("*", on_star)  # registered once
    assert obj.fire_event("answer", pre_event=True, a=1) == [42, "x"]
    assert calls == [(obj, "answer", {"a": 1})]
    obj.remove_handler("*", on_star)
    assert obj.fire_event("answer") == [42]


def test_pre_event_veto_propagates_and_is_not_forwarded() -> None:
    obj = Base()
    with pytest.raises(ValueError, match="vetoed"):
        obj.fire_event("veto", pre_event=True)
    assert obj.forwarded == []
    obj.fire_event("other", pre_event=True)
    assert obj.forwarded == [("other", True)]


def test_disabled_events_fire_nothing() -> None:
    obj = Base()
    obj.events_enabled = False
    assert obj.fire_event("veto") == []
    assert obj.forwarded == []


def test_async_handlers() -> None:
    obj = Base()
    order = []

    async def slow(subject: Any, event: str, **kwargs: Any) -> str:
        await asyncio.sleep(0)
        order.append("slow")
        return "done"

    obj.add_handler("domain-pre-start", slow)
    assert asyncio.run(obj.fire_event_async("domain-pre-start", pre_event=True)) == ["done"]
    assert order == ["slow"]
    # Fired synchronously, a coroutine handler is a programming error, not silence.
    with pytest.raises(TypeError):
        obj.fire_event("domain-pre-start")
