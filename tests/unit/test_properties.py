from __future__ import annotations

from typing import Any

import pytest

from bulkhead.errors import (QubesLabelNotFoundError, QubesNoSuchPropertyError,
                             QubesPropertyValueError, QubesValueError)
from bulkhead.events import handler
from bulkhead.labels import get_label
from bulkhead.properties import (DEFAULT, LabelProperty, Property, PropertyHolder)


def _even(holder: Any, prop: Property, value: int) -> int:
    if value % 2:
        raise QubesPropertyValueError(holder, prop.name, value, "must be even")
    return value


class Holder(PropertyHolder):
    name = "holder"
    text = Property(default="hello", doc="Some text.")
    number = Property(type=int, default=lambda h: len(h.text), setter=_even)
    flag = Property(type=bool, default=False)
    serial = Property(type=int, write_once=True)
    computed = Property(read_only=True, default=lambda h: h.text.upper())
    colour = LabelProperty()
    required = Property()

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, Any]]] = []

    @handler("property-pre-set:text")
    def _no_forbidden(self, event: str, name: str, newvalue: Any, **kwargs: Any) -> None:
        if newvalue == "forbidden":
            raise QubesValueError("no")

    def _forward_event(self, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        self.events.append((event, dict(kwargs)))


def test_defaults_and_chains() -> None:
    h = Holder()
    assert h.text == "hello" and h.property_is_default("text")
    assert h.number == 5  # computed from text
    h.text = "four"
    assert h.number == 4
    assert h.property_get_default("number") == 4
    with pytest.raises(AttributeError):
        h.required
    with pytest.raises(AttributeError):
        h.property_get_default("required")


def test_coercion_and_validation_messages() -> None:
    h = Holder()
    h.number = "12"
    assert h.number == 12 and not h.property_is_default("number")
    for value in ("1x", "", "3.5", True, None, "9" * 30):
        with pytest.raises(QubesPropertyValueError):
            h.number = value
    with pytest.raises(QubesPropertyValueError, match="must be even"):
        h.number = 3
    for text, expected in (("yes", True), ("False", False), ("1", True), ("off", False)):
        h.flag = text
        assert h.flag is expected
    with pytest.raises(QubesPropertyValueError, match="boolean"):
        h.flag = "maybe"
    with pytest.raises(QubesPropertyValueError, match="control characters"):
        h.text = "a\nb"
    h.colour = "red"
    assert h.colour == get_label("red")
    h.colour = 6
    assert h.colour.name == "blue"
    with pytest.raises(QubesLabelNotFoundError):
        h.colour = "pink"


def test_events_on_set_and_reset() -> None:
    h = Holder()
    h.text = "abc"
    assert h.events == [
        ("property-pre-set:text", {"name": "text", "newvalue": "abc", "oldvalue": "hello"}),
        ("property-set:text", {"name": "text", "newvalue": "abc", "oldvalue": "hello"}),
    ]
    h.events.clear()
    del h.text
    assert h.text == "hello" and h.property_is_default("text")
    assert h.events == [("property-pre-reset:text", {"name": "text", "oldvalue": "abc"}),
                        ("property-reset:text", {"name": "text", "oldvalue": "abc"})]
    h.events.clear()
    h.text = "xyz"
    h.text = DEFAULT
    assert h.property_is_default("text")
    h.events.clear()
    h.required = "first"  # no old value: no oldvalue key
    assert h.events[1] == ("property-set:required", {"name": "required", "newvalue": "first"})


def test_veto_leaves_value_unchanged() -> None:
    h = Holder()
    with pytest.raises(QubesValueError):
        h.text = "forbidden"
    assert h.text == "hello" and h.property_is_default("text")
    assert h.events == []


def test_write_once_and_read_only() -> None:
    h = Holder()
    h.serial = 7
    with pytest.raises(QubesPropertyValueError, match="write-once"):
        h.serial = 8
    with pytest.raises(QubesPropertyValueError, match="cannot be reset"):
        del h.serial
    assert h.serial == 7
    assert h.computed == "HELLO"
    with pytest.raises(QubesPropertyValueError, match="read-only"):
        h.computed = "x"
    with pytest.raises(QubesPropertyValueError, match="no default"):
        h.property_reset("required")


def test_introspection() -> None:
    h = Holder()
    names = h.property_names()
    assert names == sorted(names) and "text" in names and "name" not in names
    assert h.property_get_def("text").doc == "Some text."
    assert h.property_get_def("flag").wire_type == "bool"
    assert h.property_get_def("number").wire_type == "int"
    assert h.property_get_def("colour").wire_type == "label"
    with pytest.raises(QubesNoSuchPropertyError):
        h.property_get_def("nope")
    h.load_property("text", "loaded")  # no event, no check
    assert h.text == "loaded" and h.events == []


def test_sanitize_rejects_non_ascii() -> None:
    h = Holder()
    prop = h.property_get_def("text")
    assert prop.sanitize(h, b"plain") == "plain"
    with pytest.raises(QubesPropertyValueError, match="ASCII"):
        prop.sanitize(h, b"\xff\xfe")
    with pytest.raises(QubesPropertyValueError):
        prop.sanitize(h, b"a\0b")
