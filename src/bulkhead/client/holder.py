"""Objects whose properties live in the daemon: qubes and the app (global properties).

A property is read with ``PREFIX.Get+NAME`` (``admin.vm.property.`` for a
qube, ``admin.property.`` for the app), whose reply is typed::

    default=True type=vm sys-firewall

and is turned into a Python value: ``str``, ``int``, ``bool``, a :class:`VM`
(``type=vm``; empty = None), a :class:`Label` (``type=label``).  A property
that exists but has no value (an unset bool or int) reads as AttributeError,
as in Qubes' client.

Attribute access maps onto these calls (``vm.netvm``, ``vm.netvm = other``,
``del vm.netvm`` resets to the default) for anything that is not a real
attribute of the Python class.  Every attribute the class itself keeps must
therefore start with ``_`` or be defined on the class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import errors

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

#: Returned by :meth:`PropertyHolder.get_property` for a property without a value.
NO_VALUE: Any = AttributeError

#: Pass as a value to reset a property to its default (same as ``del obj.prop``).
DEFAULT = object()


def serialize_value(value: Any) -> bytes:
    """The payload of ``property.Set`` for a Python value."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"True" if value else b"False"
    name = getattr(value, "name", None)  # VM, Label: sent by name
    if name is not None and not isinstance(value, (str, int)):
        return str(name).encode("utf-8")
    return str(value).encode("utf-8")


def _unescape(text: str) -> str:
    """Undo GetAll's escaping of ``\\`` and newlines inside a value."""
    if "\\" not in text:  # the common case, and qvm-ls reads thousands of these
        return text
    out = []
    escaped = False
    for ch in text:
        if escaped:
            out.append("\n" if ch == "n" else ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _split_get_all(body: str) -> dict[str, str]:
    """A GetAll body as property name -> its text (``default=... type=... VALUE``, still
    escaped: :meth:`PropertyHolder._lookup` parses a property when it is first read)."""
    texts = {}
    for line in body.split("\n"):
        if line:
            name, _, text = line.partition(" ")
            texts[name] = text
    return texts


class PropertyHolder:
    """Base of :class:`~bulkhead.client.vm.VM` and :class:`~bulkhead.client.app.App`."""

    _method_prefix: str = ""

    def __init__(self, app: "App", dest: str) -> None:
        self._app = app
        self._dest = dest
        self._property_names: list[str] | None = None
        #: name -> (is_default, value); filled from ``_raw`` as properties are read
        self._cache: dict[str, tuple[bool, Any]] = {}
        #: name -> its GetAll text, still escaped and unparsed (parsed when first read:
        #: qvm-ls reads a few of each qube's 25 properties)
        self._raw: dict[str, str] = {}
        self._cache_loaded = False

    # --- calls ---------------------------------------------------------------
    def _call(self, method: str, arg: str | None = None, payload: bytes = b"") -> bytes:
        return self._app.call(self._dest, method, arg, payload)

    def clear_cache(self) -> None:
        self._cache = {}
        self._raw = {}
        self._cache_loaded = False

    # --- parsing ---------------------------------------------------------------
    def parse_typed_value(self, prop_type: str, value: str) -> Any:
        """A ``type=T VALUE`` pair as a Python value (NO_VALUE when there is none)."""
        if prop_type == "str":
            return value
        if prop_type in ("bool", "int"):
            if value == "":
                return NO_VALUE
            return value == "True" if prop_type == "bool" else int(value)
        if prop_type == "vm":
            return self._app.domains.get_blind(value) if value else None
        if prop_type == "label":
            return self._app.labels.get_blind(value) if value else None
        raise errors.QubesDaemonCommunicationError(f"unknown property type {prop_type!r}")

    def _parse_get(self, reply: str) -> tuple[bool, Any]:
        """Get's reply ``default=True|False type=TYPE VALUE`` as (is_default, value)."""
        parts = reply.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("default=") or not parts[1].startswith("type="):
            raise errors.QubesDaemonCommunicationError(f"malformed property reply {reply[:80]!r}")
        value = parts[2] if len(parts) == 3 else ""
        return parts[0] == "default=True", self.parse_typed_value(parts[1][5:], value)

    def _fetch_all(self) -> dict[str, str] | None:
        """Every property's GetAll text by name (see :func:`_split_get_all`), from one
        GetAll call; None if the daemon refuses it."""
        try:
            reply = self._call(self._method_prefix + "GetAll")
        except errors.QubesVMNotFoundError:
            raise
        except errors.QubesException:
            return None
        return _split_get_all(reply.decode("utf-8"))

    def _load_all(self) -> None:
        """Fill the cache with all the properties at once; if the daemon cannot, fall back
        to single Gets."""
        self._cache_loaded = True
        raw = self._fetch_all()
        if raw is None:
            return
        self._cache = {}
        self._raw = raw
        self._property_names = sorted(raw)

    def _lookup(self, name: str) -> tuple[bool, Any]:
        if self._app.cache_enabled and not self._cache_loaded:
            self._load_all()
        if name in self._cache:
            return self._cache[name]
        raw = self._raw.pop(name, None)
        if raw is not None:
            result = self._cache[name] = self._parse_get(_unescape(raw))
            return result
        if self._cache_loaded and self._property_names is not None and name not in self._property_names:
            raise errors.QubesNoSuchPropertyError(self._dest, name)
        result = self._parse_get(self._call(self._method_prefix + "Get", name).decode("utf-8"))
        if self._app.cache_enabled:
            self._cache[name] = result
        return result

    def load_all_properties(self) -> None:
        """Fetch all of this object's properties now, in one call, and read them from
        there from now on (qvm-prefs' listing); :meth:`clear_cache` forgets them."""
        self._load_all()

    # --- the public interface --------------------------------------------------
    def property_list(self) -> list[str]:
        """Names of the properties the daemon knows for this object."""
        if self._property_names is None:
            reply = self._call(self._method_prefix + "List")
            self._property_names = [n for n in reply.decode("ascii").splitlines() if n]
        return self._property_names

    def property_is_default(self, name: str) -> bool:
        return self._lookup(name)[0]

    def get_property(self, name: str) -> Any:
        """The value (NO_VALUE if the property has none); raises QubesNoSuchPropertyError."""
        return self._lookup(name)[1]

    def set_property(self, name: str, value: Any) -> None:
        if value is DEFAULT:
            self.reset_property(name)
            return
        self._call(self._method_prefix + "Set", name, serialize_value(value))
        self._forget(name)

    def reset_property(self, name: str) -> None:
        self._call(self._method_prefix + "Reset", name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        """After a Set or Reset: what is cached of ``name`` is stale, and so may be what
        GetAllOfAll brought for the qubes not read yet (their defaults may follow it)."""
        self._cache.pop(name, None)
        self._raw.pop(name, None)
        self._app.domains.forget_prefetched()

    def property_help(self, name: str) -> str:
        return self._call(self._method_prefix + "Help", name).decode("utf-8")

    def property_get_default(self, name: str) -> Any:
        reply = self._call(self._method_prefix + "GetDefault", name).decode("utf-8")
        if not reply:
            return NO_VALUE
        prop_type, _, value = reply.partition(" ")
        return self.parse_typed_value(prop_type.removeprefix("type="), value)

    # --- attribute access --------------------------------------------------
    @classmethod
    def _is_local(cls, name: str) -> bool:
        return name.startswith("_") or any(name in klass.__dict__ for klass in cls.__mro__)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup failed: the name is a daemon property
        if self._is_local(name):
            raise AttributeError(name)
        try:
            value = self.get_property(name)
        except errors.QubesNoSuchPropertyError:
            raise AttributeError(name) from None
        if value is NO_VALUE:
            raise AttributeError(name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # "_" first, without a call: each VM sets ten such attributes when made
        if name[:1] == "_" or self._is_local(name):
            object.__setattr__(self, name, value)
        else:
            self.set_property(name, value)

    def __delattr__(self, name: str) -> None:
        if self._is_local(name):
            object.__delattr__(self, name)
        else:
            self.reset_property(name)
