"""What every qube has: a name, a qid, a uuid, a label, features and tags.

:class:`BaseVM` is the common base of the AdminVM (dom0) and of every real
qube (:class:`bulkhead.vm.qubesvm.QubesVM`).  It holds no power logic.

A qube object is built with its events disabled; it starts to fire events
once it is added to the app's collection (``domain-add``).  Building it is
not a change anyone needs to hear of; the store persists the whole qube on
``domain-add``.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import (QubesFeatureNotFoundError, QubesPropertyValueError,
                      QubesTagNotFoundError, QubesValueError)
from ..properties import LabelProperty, Property, PropertyHolder

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App
    from ..storage.pool import VolumeConfig

MAX_QID = 254  # as Qubes: qids are small, stable numbers (addresses derive from them)

_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
_TAG_RE = re.compile(r"\A[a-zA-Z0-9_-]{1,128}\Z")
_FEATURE_RE = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.+-]{0,127}\Z")
_RESERVED_NAMES = frozenset({"none", "default", "dom0", ".", ".."})


def validate_name(holder: Any, prop: Any, value: Any) -> str:
    """Check a qube name as Qubes does; raises QubesValueError (QubesPropertyValueError
    when ``holder`` is given) with a message that says what is wrong."""

    def fail(msg: str) -> QubesValueError:
        if holder is not None:
            return QubesPropertyValueError(holder, "name", value, msg)
        return QubesValueError(msg)

    if not isinstance(value, str):
        raise fail(f"VM name must be a string, not {type(value).__name__}")
    if len(value) > 31:
        raise fail(f"VM name must be shorter than 32 characters: {value[:40]!r}")
    if not value or not ("a" <= value[0].lower() <= "z"):
        raise fail(f"VM name must start with a letter: {value!r}")
    if not _NAME_RE.match(value):
        raise fail(f"VM name contains illegal characters: {value!r}")
    if value.endswith("-dm"):
        raise fail(f"VM name cannot end with '-dm': {value!r}")
    if value in _RESERVED_NAMES and not (value == "dom0" and type(holder).__name__ == "AdminVM"):
        raise fail(f"VM name {value!r} is reserved")
    return value


def validate_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        shown = tag[:64] if isinstance(tag, str) else tag
        raise QubesValueError(f"Invalid tag {shown!r}: a tag is 1 to 128 letters, digits, "
                              f"'-' or '_'")
    return tag


def validate_feature_name(feature: Any) -> str:
    if not isinstance(feature, str) or not _FEATURE_RE.match(feature):
        shown = feature[:64] if isinstance(feature, str) else feature
        raise QubesValueError(f"Invalid feature name {shown!r}")
    return feature


def _setter_name(holder: Any, prop: Property, value: str) -> str:
    return validate_name(holder, prop, value)


def _setter_qid(holder: Any, prop: Property, value: int) -> int:
    lowest = 0 if type(holder).__name__ == "AdminVM" else 1
    if not lowest <= value <= MAX_QID:
        raise QubesPropertyValueError(holder, "qid", value,
                                      f"qid must be between {lowest} and {MAX_QID}")
    return value


def _setter_uuid(holder: Any, prop: Property, value: str) -> str:
    try:
        parsed = uuid_mod.UUID(value)
    except ValueError:
        raise QubesPropertyValueError(holder, "uuid", value, f"Invalid UUID {value!r}") from None
    return str(parsed)


_NO_DEFAULT: Any = object()


class Features:
    """A qube's features: string keys to string values, as Qubes has them.

    A value is a string; ``''`` means false.  Assigning True/False stores
    ``'1'``/``''``.  Changes fire ``domain-feature-pre-set:KEY`` /
    ``domain-feature-set:KEY`` (``feature``, ``value``, ``oldvalue``) and
    ``domain-feature-pre-delete:KEY`` / ``domain-feature-delete:KEY``.
    """

    def __init__(self, vm: "BaseVM") -> None:
        self.vm = vm
        self._data: dict[str, str] = {}

    @staticmethod
    def coerce_value(value: Any) -> str:
        if value is None or isinstance(value, bool):
            value = "1" if value else ""
        value = str(value)
        if not value.isascii() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise QubesValueError("A feature value must be ASCII text without control characters")
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        validate_feature_name(key)
        value = self.coerce_value(value)
        kwargs: dict[str, Any] = {"feature": key, "value": value}
        if key in self._data:
            kwargs["oldvalue"] = self._data[key]
        self.vm.fire_event("domain-feature-pre-set:" + key, pre_event=True, **kwargs)
        self._data[key] = value
        self.vm.fire_event("domain-feature-set:" + key, **kwargs)

    def __delitem__(self, key: str) -> None:
        if key not in self._data:
            raise QubesFeatureNotFoundError(self.vm, key)
        self.vm.fire_event("domain-feature-pre-delete:" + key, pre_event=True, feature=key)
        del self._data[key]
        self.vm.fire_event("domain-feature-delete:" + key, feature=key)

    def __getitem__(self, key: str) -> str:
        try:
            return self._data[key]
        except KeyError:
            raise QubesFeatureNotFoundError(self.vm, key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[str]:
        return list(self._data)

    def items(self) -> list[tuple[str, str]]:
        return list(self._data.items())

    def load(self, key: str, value: str) -> None:
        """Put a stored feature back (no event)."""
        self._data[key] = value

    # --- lookups along the chain, as Qubes' Features has them ---------------
    def _chain(self, feature: str, *sources: Any, default: Any = _NO_DEFAULT) -> str:
        for source in sources:
            if source is not None and feature in source.features:
                return source.features[feature]
        if default is _NO_DEFAULT:
            raise QubesFeatureNotFoundError(self.vm, feature)
        return default

    def _template(self) -> Any:
        return getattr(self.vm, "template", None)

    def check_with_template(self, feature: str, default: Any = _NO_DEFAULT) -> str:
        """The qube's own value, else its template's."""
        return self._chain(feature, self.vm, self._template(), default=default)

    def check_with_adminvm(self, feature: str, default: Any = _NO_DEFAULT) -> str:
        return self._chain(feature, self.vm, self.vm.app.domains.get("dom0"), default=default)

    def check_with_template_and_adminvm(self, feature: str, default: Any = _NO_DEFAULT) -> str:
        return self._chain(feature, self.vm, self._template(),
                           self.vm.app.domains.get("dom0"), default=default)

    def check_with_netvm(self, feature: str, default: Any = _NO_DEFAULT) -> str:
        return self._chain(feature, self.vm, getattr(self.vm, "netvm", None), default=default)


class Tags:
    """A qube's tags (a set of names); ``domain-tag-add:TAG`` / ``domain-tag-delete:TAG``."""

    def __init__(self, vm: "BaseVM") -> None:
        self.vm = vm
        self._tags: set[str] = set()

    def add(self, tag: str) -> None:
        validate_tag(tag)
        if tag in self._tags:
            return
        self._tags.add(tag)
        self.vm.fire_event("domain-tag-add:" + tag, tag=tag)

    def remove(self, tag: str) -> None:
        if tag not in self._tags:
            raise QubesTagNotFoundError(self.vm, tag)
        self._tags.remove(tag)
        self.vm.fire_event("domain-tag-delete:" + tag, tag=tag)

    def discard(self, tag: str) -> None:
        if tag in self._tags:
            self.remove(tag)

    def load(self, tag: str) -> None:
        """Put a stored (or an automatic, at creation) tag back (no event)."""
        self._tags.add(validate_tag(tag))

    def __contains__(self, tag: object) -> bool:
        return tag in self._tags

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._tags))

    def __len__(self) -> int:
        return len(self._tags)


class BaseVM(PropertyHolder):
    """Common base of every qube class."""

    #: the icon family Qubes' GUI uses ("appvm" -> "appvm-red")
    icon_family = "appvm"
    #: True for the classes whose root is their own (updates persist)
    updateable_class = False

    name = Property(write_once=True, setter=_setter_name,
                    doc="The qube's name: a letter, then up to 30 letters, digits, '_', '.' "
                        "or '-'. It cannot be changed once the qube exists.")
    qid = Property(type=int, write_once=True, setter=_setter_qid,
                   doc="Internal, persistent identifier of the qube (1-254; dom0 is 0).")
    uuid = Property(write_once=True, setter=_setter_uuid,
                    doc="The qube's UUID, given at creation and never changed.")
    label = LabelProperty(doc="Colour of the qube's windows and icons, which tells how much "
                              "you trust it: red, orange, yellow, green, gray, blue, purple "
                              "or black.")
    klass = Property(read_only=True, default=lambda self: type(self).__name__,
                     doc="The class of the qube (AppVM, TemplateVM...).")
    icon = Property(read_only=True, default=lambda self: self.icon_name(),
                    doc="Name of the qube's icon, derived from its class and label.")

    def __init__(self, app: "App", **properties: Any) -> None:
        super().__init__()
        self.app = app
        # Built silently; the app enables events when it adds the qube.
        self.events_enabled = False
        self.features = Features(self)
        self.tags = Tags(self)
        #: volume name -> configuration, set at creation and kept in the store
        self.volume_config: dict[str, "VolumeConfig"] = {}
        for key, value in properties.items():
            setattr(self, self.property_get_def(key).name, value)

    def icon_name(self) -> str:
        try:
            color = self.label.name
        except AttributeError:
            color = "black"
        return f"{self.icon_family}-{color}"

    # Qubes sorts qubes by name, and prints them by name.
    def __lt__(self, other: Any) -> bool:
        if isinstance(other, BaseVM):
            return self.name < other.name
        return NotImplemented

    def __str__(self) -> str:
        return self.__dict__.get("_property_values", {}).get("name", "<unnamed>")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"

    def _forward_event(self, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        self.app.observe(self, event, pre_event, kwargs)

    # --- power state, overridden by the classes that have a machine ---------
    def get_power_state(self) -> str:
        return "Halted"

    def is_running(self) -> bool:
        return self.get_power_state() in ("Running", "Transient", "Halting")

    def is_paused(self) -> bool:
        return self.get_power_state() == "Paused"

    def is_halted(self) -> bool:
        # A crashed machine is gone as well: the lifecycle settled its volumes.
        return self.get_power_state() in ("Halted", "Crashed")
