"""Typed properties: the settings of a qube or of the whole system.

A :class:`Property` is a descriptor on a :class:`PropertyHolder` (a qube, or
the app for global settings) with what Qubes' ``qubes.property`` has:

- a name, a type (``str``, ``int``, ``bool``; :class:`VMProperty` for a
  reference to a qube; :class:`LabelProperty`), and a ``doc`` that
  ``admin.vm.property.Help`` returns;
- a default, constant or computed from the holder (so defaults chain: an
  AppVM's ``memory`` is its template's unless set, its ``netvm`` is the global
  ``default_netvm``...).  A property without a default that was never set
  raises AttributeError when read;
- a value is either *set* (explicit, stored) or *default*;
  :meth:`PropertyHolder.property_is_default` tells which, and deleting the
  attribute (or assigning :data:`DEFAULT`) resets it;
- validation: values are coerced to the type (``"400"`` -> 400, ``"yes"`` ->
  True) and checked by an optional ``setter(holder, prop, value) -> value``;
  a bad value raises :class:`QubesPropertyValueError` (a QubesValueError);
- ``write_once`` properties (``qid``, ``uuid``, ``name``) may be set once,
  when the object is made, never changed nor reset; ``read_only`` ones are
  computed (``klass``, ``icon``) and cannot be set at all.

Setting fires ``property-pre-set:NAME`` (a handler may veto by raising) then
``property-set:NAME``, with ``name``, ``newvalue`` and ``oldvalue`` (the
effective old value, default included, when there was one).  Resetting fires
``property-pre-reset:NAME`` and ``property-reset:NAME`` with ``name`` and
``oldvalue``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .errors import QubesNoSuchPropertyError, QubesPropertyValueError, QubesVMNotFoundError
from .events import Emitter
from .labels import Label, get_label

if TYPE_CHECKING:  # pragma: no cover
    from .app import App


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: A property declared without a default.
NO_DEFAULT: Any = _Sentinel("NO_DEFAULT")
#: Assign this to a property to reset it to its default.
DEFAULT: Any = _Sentinel("DEFAULT")

Setter = Callable[[Any, "Property", Any], Any]  # (holder, property, value) -> value

_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
_MAX_INT = 2**63 - 1


def _has_control_chars(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


class Property:
    """A typed property (see the module documentation)."""

    def __init__(self, name: str | None = None, *, type: type = str, default: Any = NO_DEFAULT,
                 setter: Setter | None = None, write_once: bool = False,
                 read_only: bool = False, doc: str = "") -> None:
        if type not in (str, int, bool, Label) and not isinstance(self, VMProperty):
            raise TypeError(f"unsupported property type {type!r}")
        self.name = name or ""
        self.type = type
        self.default = default
        self.setter = setter
        self.write_once = write_once
        self.read_only = read_only
        self.__doc__ = doc

    @property
    def doc(self) -> str:
        return self.__doc__ or ""

    def __set_name__(self, owner: type, attr: str) -> None:
        if not self.name:
            self.name = attr
        elif self.name != attr:
            raise TypeError(f"property {self.name!r} bound to attribute {attr!r}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # --- what admin.vm.property.* report --------------------------------
    @property
    def wire_type(self) -> str:
        """``type=`` of admin.vm.property.Get: str, int, bool, vm or label."""
        if self.type is bool:
            return "bool"
        if self.type is int:
            return "int"
        if self.type is Label:
            return "label"
        return "str"

    @staticmethod
    def to_text(value: Any) -> str:
        """The value as the wire and the store spell it (None is the empty string)."""
        if value is None:
            return ""
        if isinstance(value, bool):
            return "True" if value else "False"
        return str(value)

    # --- reading ----------------------------------------------------------
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT

    def get_default(self, holder: "PropertyHolder") -> Any:
        """The default value for ``holder``; AttributeError if there is none."""
        if self.default is NO_DEFAULT:
            raise AttributeError(f"property {self.name!r} has no default")
        if callable(self.default):
            return self.default(holder)
        return self.default

    def __get__(self, holder: "PropertyHolder | None", owner: type | None = None) -> Any:
        if holder is None:
            return self
        values = holder.__dict__.get("_property_values", {})
        if self.name in values:
            return values[self.name]
        return self.get_default(holder)

    # --- validation -------------------------------------------------------
    def error(self, holder: Any, value: Any, msg: str) -> QubesPropertyValueError:
        return QubesPropertyValueError(holder, self.name, value, msg)

    def sanitize(self, holder: Any, untrusted_value: bytes) -> str:
        """Decode a value received from a client; the type check follows in :meth:`coerce`."""
        try:
            value = untrusted_value.decode("ascii", "strict")
        except UnicodeDecodeError:
            raise self.error(holder, "<binary>",
                             f"Value of property {self.name!r} must be ASCII text") from None
        if _has_control_chars(value):
            raise self.error(holder, value,
                             f"Value of property {self.name!r} must not contain control characters")
        return value

    def coerce(self, holder: Any, value: Any) -> Any:
        """Convert ``value`` to the property's type, or raise QubesPropertyValueError."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise self.error(holder, value, f"Property {self.name!r} must be a boolean "
                                            f"(True/False), not {value!r}")
        if self.type is int:
            if isinstance(value, int) and not isinstance(value, bool):
                number = value
            elif isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii() \
                    and len(value) <= 20:
                number = int(value)
            else:
                raise self.error(holder, value, f"Property {self.name!r} must be an integer, "
                                                f"not {value!r}")
            if abs(number) > _MAX_INT:
                raise self.error(holder, value, f"Property {self.name!r} is out of range")
            return number
        if self.type is Label:
            return get_label(value)
        if not isinstance(value, str):
            raise self.error(holder, value, f"Property {self.name!r} must be a string, "
                                            f"not {type(value).__name__}")
        if _has_control_chars(value):
            raise self.error(holder, value,
                             f"Value of property {self.name!r} must not contain control characters")
        return value

    # --- writing ----------------------------------------------------------
    def __set__(self, holder: "PropertyHolder", value: Any) -> None:
        if value is DEFAULT:
            self.__delete__(holder)
            return
        values = holder.__dict__.setdefault("_property_values", {})
        if self.read_only:
            raise self.error(holder, value, f"Property {self.name!r} is read-only")
        if self.write_once and self.name in values:
            raise self.error(holder, value, f"Property {self.name!r} is write-once and already set")
        value = self.coerce(holder, value)
        if self.setter is not None:
            value = self.setter(holder, self, value)
        kwargs: dict[str, Any] = {"name": self.name, "newvalue": value}
        try:
            kwargs["oldvalue"] = self.__get__(holder)
        except AttributeError:
            pass
        holder.fire_event("property-pre-set:" + self.name, pre_event=True, **kwargs)
        values[self.name] = value
        holder.fire_event("property-set:" + self.name, **kwargs)

    def __delete__(self, holder: "PropertyHolder") -> None:
        if self.read_only or self.write_once:
            raise self.error(holder, None, f"Property {self.name!r} cannot be reset")
        if not self.has_default():
            raise self.error(holder, None, f"Property {self.name!r} has no default value "
                                           f"to reset to")
        values = holder.__dict__.setdefault("_property_values", {})
        kwargs: dict[str, Any] = {"name": self.name}
        try:
            kwargs["oldvalue"] = self.__get__(holder)
        except AttributeError:
            pass
        holder.fire_event("property-pre-reset:" + self.name, pre_event=True, **kwargs)
        values.pop(self.name, None)
        holder.fire_event("property-reset:" + self.name, **kwargs)


class LabelProperty(Property):
    """The qube's label (``type=label`` on the wire)."""

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, type=Label, **kwargs)


class VMProperty(Property):
    """A reference to a qube (``type=vm``); set by name or object, ``''`` is None.

    ``vmclass`` names the classes a qube must be of (by class name, so that
    the qube modules need not import each other).
    """

    def __init__(self, name: str | None = None, *, vmclass: tuple[str, ...] | str | None = None,
                 allow_none: bool = False, **kwargs: Any) -> None:
        super().__init__(name, type=object, **kwargs)
        self.vmclass = (vmclass,) if isinstance(vmclass, str) else vmclass
        self.allow_none = allow_none

    @property
    def wire_type(self) -> str:
        return "vm"

    def coerce(self, holder: Any, value: Any) -> Any:
        if value is None or value == "":
            if self.allow_none:
                return None
            raise self.error(holder, value, f"Property {self.name!r} cannot be empty")
        app: "App" = holder.app
        if isinstance(value, str):
            if _has_control_chars(value):
                raise self.error(holder, value, f"Invalid qube name for property {self.name!r}")
            try:
                vm = app.domains[value]
            except KeyError:
                raise QubesVMNotFoundError(value) from None
        else:
            vm = value
            name = getattr(vm, "name", None)
            if name is None or app.domains.get(name) is not vm:
                raise self.error(holder, value,
                                 f"Property {self.name!r} must name an existing qube")
        if self.vmclass is not None and type(vm).__name__ not in self.vmclass:
            raise self.error(holder, vm.name,
                             f"Property {self.name!r} must be a qube of class "
                             f"{' or '.join(self.vmclass)}, and {vm.name!r} is a "
                             f"{type(vm).__name__}")
        return vm


class PropertyHolder(Emitter):
    """Something with properties: a qube, or the app (global properties)."""

    def __init__(self) -> None:
        self._property_values: dict[str, Any] = {}

    @classmethod
    def property_list(cls) -> list[Property]:
        """Every property of this class, sorted by name."""
        cached = cls.__dict__.get("_bulkhead_property_list")
        if cached is not None:
            return cached
        props: dict[str, Property] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, Property):
                    props[attr] = value
                elif attr in props:  # a subclass hid the property with something else
                    del props[attr]
        result = sorted(props.values(), key=lambda prop: prop.name)
        setattr(cls, "_bulkhead_property_list", result)
        return result

    @classmethod
    def property_dict(cls) -> dict[str, Property]:
        """Every property of this class by name (computed once per class)."""
        cached = cls.__dict__.get("_bulkhead_property_dict")
        if cached is None:
            cached = {prop.name: prop for prop in cls.property_list()}
            setattr(cls, "_bulkhead_property_dict", cached)
        return cached

    def property_names(self) -> list[str]:
        return [prop.name for prop in self.property_list()]

    def property_get_def(self, name: str) -> Property:
        try:
            return self.property_dict()[name]
        except KeyError:
            raise QubesNoSuchPropertyError(self, name) from None

    def property_is_default(self, name: str) -> bool:
        self.property_get_def(name)
        return name not in self._property_values

    def property_value(self, prop: Property) -> tuple[bool, Any]:
        """``(is_default, value)`` of ``prop`` in one lookup (what admin.vm.property.Get
        reports); AttributeError if it is unset and has no default."""
        values = self._property_values
        if prop.name in values:
            return False, values[prop.name]
        return True, prop.get_default(self)

    def property_get_default(self, name: str) -> Any:
        """The value ``name`` has when reset; AttributeError if it has none."""
        return self.property_get_def(name).get_default(self)

    def property_reset(self, name: str) -> None:
        self.property_get_def(name).__delete__(self)

    def explicit_properties(self) -> dict[str, Any]:
        """The properties set explicitly (what the store keeps)."""
        return dict(self._property_values)

    def load_property(self, name: str, value: Any) -> None:
        """Put a stored value back, with no event and no check (loading is not a change)."""
        self.property_get_def(name)
        self._property_values[name] = value
