"""The Admin API's methods: who handles which, and the rules each request must meet.

A *plain* method reads the whole payload (up to its ``max_payload``), then
returns the body of the reply::

    @method("admin.vm.tag.Get", arg=True)
    async def tag_get(call: Call) -> str:
        ...

A *streaming* method takes over the connection right after the header, for
a conversation rather than one request and one reply (``admin.Events``; and
``bulkhead.vm.Run``, qvm-run's framed command stream)::

    @stream("bulkhead.vm.Run", dest="vm")
    async def run(call: Call, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        ...

The server has already checked the header, the destination and the
argument; the handler owns the reader and writer until it returns (the
server then closes the connection), and applies its own limits and
timeouts.  An exception it raises *before writing anything* becomes the
usual error reply; once it has written, it reports errors in its own
framing.  A module only has to define its handler with one of these
decorators and be listed in :data:`bulkhead.api.OPTIONAL_METHOD_MODULES`
(``bulkhead.api.run`` already is), which :func:`bulkhead.api.load_methods`
imports.

``dest`` is ``"any"``, ``"dom0"`` (the method concerns the whole system) or
``"vm"`` (a qube other than dom0); ``arg`` and ``payload`` are True
(required), False (forbidden) or None (either).  A handler raises Qubes'
exceptions; the server turns them into error replies.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from ..errors import ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App
    from ..vm import BaseVM

DEFAULT_MAX_PAYLOAD = 64 * 1024

PlainHandler = Callable[["Call"], Awaitable["str | bytes | None"]]
StreamHandler = Callable[..., Awaitable[None]]


@dataclass
class Call:
    """One request, its destination resolved and its argument checked."""

    app: "App"
    src: "BaseVM"
    dest: "BaseVM"
    method: str
    arg: str
    endpoint: str | None = None
    untrusted_payload: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def enforce(predicate: Any, reason: str = "request not allowed") -> None:
        if not predicate:
            raise ProtocolError(reason)

    @staticmethod
    def validate_number(untrusted_number: bytes, what: str) -> int:
        """A non-negative decimal, as Qubes accepts it: digits only, no leading zero,
        fewer than 20 digits."""
        untrusted_number = untrusted_number.strip()
        if not untrusted_number or not all(c in string.digits.encode() for c in untrusted_number):
            raise ProtocolError(f"{what.capitalize()} must be a decimal number")
        if len(untrusted_number) >= 20:
            raise ProtocolError(f"{what.capitalize()} is bigger than 19 decimal digits")
        if untrusted_number[0:1] == b"0" and untrusted_number != b"0":
            raise ProtocolError(f"{what.capitalize()} contains spurious leading zeros")
        return int(untrusted_number)

    def payload_text(self, what: str = "payload") -> str:
        """The payload as ASCII text (ProtocolError otherwise)."""
        try:
            return self.untrusted_payload.decode("ascii", "strict")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not ASCII") from None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    handler: Callable[..., Awaitable[Any]]
    dest: str = "any"
    arg: bool | None = None
    payload: bool | None = False
    max_payload: int = DEFAULT_MAX_PAYLOAD
    streaming: bool = False
    endpoint: str | None = None


class Registry:
    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec] = {}

    def _register(self, spec: MethodSpec) -> None:
        if spec.dest not in ("any", "dom0", "vm"):
            raise ValueError(f"bad dest rule {spec.dest!r} for {spec.name}")
        if spec.name in self._methods:
            raise ValueError(f"method {spec.name} registered twice")
        self._methods[spec.name] = spec

    def method(self, name: str, *, dest: str = "any", arg: bool | None = None,
               payload: bool | None = False, max_payload: int = DEFAULT_MAX_PAYLOAD,
               endpoints: Iterable[str] | None = None) -> Callable[[PlainHandler], PlainHandler]:
        """Register a plain method; ``{endpoint}`` in ``name`` with ``endpoints``
        registers one method per endpoint (``admin.vm.Create.{endpoint}``)."""

        def decorator(func: PlainHandler) -> PlainHandler:
            for full_name, endpoint in _expand(name, endpoints):
                self._register(MethodSpec(full_name, func, dest, arg, payload, max_payload,
                                          False, endpoint))
            return func

        return decorator

    def stream(self, name: str, *, dest: str = "any",
               arg: bool | None = None) -> Callable[[StreamHandler], StreamHandler]:
        """Register a streaming method (it takes over the connection after the header)."""

        def decorator(func: StreamHandler) -> StreamHandler:
            self._register(MethodSpec(name, func, dest, arg, None, 0, True))
            return func

        return decorator

    def lookup(self, name: str) -> MethodSpec | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)


def _expand(name: str, endpoints: Iterable[str] | None) -> list[tuple[str, str | None]]:
    if endpoints is None:
        return [(name, None)]
    return [(name.format(endpoint=endpoint), endpoint) for endpoint in endpoints]


#: The daemon's registry; the module-level decorators register into it.
REGISTRY = Registry()
method = REGISTRY.method
stream = REGISTRY.stream
