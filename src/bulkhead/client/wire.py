"""The Admin API wire format, client side: requests, replies, events.

This module is pure byte handling (no sockets), so every rule of the format is
in one place and can be tested byte for byte.

Request (what Qubes' ``qubesadmin.app.QubesLocal.qubesd_call`` sends)::

    METHOD+ARG SOURCE name DEST \\0 PAYLOAD

The ``+`` is always present, even with an empty argument
(``admin.vm.List+ dom0 name dom0``): that is what Qubes' client sends and
what qubesd parses (it splits ``METHOD+ARG`` on the first ``+``).  The client
then shuts down its write side; the end of the payload is the end of the stream.

Reply::

    0\\0 BODY                                              success
    2\\0 TYPE \\0 TRACEBACK \\0 FORMAT \\0 (ARG \\0)*      an exception
    (1\\0 SUBJECT \\0 EVENT \\0 (KEY \\0 VALUE \\0)* \\0)*  events (admin.Events)
"""

from __future__ import annotations

from typing import NamedTuple

from .. import errors

SOURCE = "dom0"

OK = b"0\0"
EVENT = b"1\0"
EXCEPTION = b"2\0"


def _check_token(what: str, value: str) -> None:
    # A space or NUL would shift the fields of the header: refuse rather than
    # send something the daemon would parse differently from what we meant.
    if not value or any(c in value for c in " \0\n") or not value.isascii():
        raise errors.QubesValueError(f"invalid {what} for an Admin API call: {value!r}")


def encode_header(method: str, dest: str, arg: str | None = None, *, plus: bool = True) -> bytes:
    """The request header, ``METHOD+ARG dom0 name DEST\\0``.

    ``plus=False`` leaves out the ``+`` when there is no argument (the form the
    ``bulkhead.vm.Run`` stream uses).
    """
    _check_token("method", method)
    _check_token("destination", dest)
    if arg:
        _check_token("argument", arg)
    service = method + ("+" + arg if arg else ("+" if plus else ""))
    return f"{service} {SOURCE} name {dest}".encode("ascii") + b"\0"


def encode_request(method: str, dest: str, arg: str | None = None, payload: bytes = b"") -> bytes:
    """Header then payload: everything a request sends before shutting down its write side."""
    return encode_header(method, dest, arg) + (payload or b"")


def exception_from_fields(exc_type: bytes, fmt: bytes, args: list[bytes]) -> Exception:
    """Build the exception an error reply describes.

    The class is looked up by name in :mod:`bulkhead.errors` (the names are
    Qubes'); an unknown name becomes a plain QubesException.  Our exception
    classes have varied constructors (``QubesVMError(vm, msg)``...), so the
    object is built without calling them: only the class and the message
    matter to the caller.
    """
    name = exc_type.decode("ascii", "replace")
    cls = errors.by_name(name)
    if cls is None or not issubclass(cls, Exception):
        cls = errors.QubesException
    text = fmt.decode("utf-8", "replace")
    str_args = [a.decode("utf-8", "replace") for a in args]
    try:
        # as Qubes' client: the message is always a format string (so "%%" is
        # a literal "%"), and an all-digit argument is a number (for %d)
        text = text % tuple(int(a) if a.isdigit() else a for a in str_args)
    except (TypeError, ValueError):
        text = " ".join([text, *str_args])
    try:
        exc = cls.__new__(cls)
    except TypeError:
        # classes that also derive from a builtin with its own __new__
        # (QubesMemoryError is a MemoryError) can only be made by calling them
        exc = _plain_init(cls)(text)
    Exception.__init__(exc, text)
    return exc


_PLAIN: dict[type, type] = {}


def _plain_init(cls: type[Exception]) -> type[Exception]:
    """A subclass of ``cls`` (same name) whose constructor takes just the message."""
    if cls not in _PLAIN:
        _PLAIN[cls] = type(cls.__name__, (cls,), {
            "__init__": lambda self, message: Exception.__init__(self, message),
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _PLAIN[cls]


def parse_reply(data: bytes) -> bytes:
    """The body of a success reply; raises the exception of an error reply."""
    if not data:
        raise errors.QubesDaemonAccessError(
            "the Bulkhead daemon closed the connection without an answer "
            "(see the daemon's log for details)")
    if data.startswith(OK):
        return data[2:]
    if data.startswith(EXCEPTION):
        fields = data[2:].split(b"\0")
        # TYPE, TRACEBACK, FORMAT, then each argument followed by \0: the
        # final split element is the empty string after the last \0.
        if len(fields) < 4 or fields[-1] != b"":
            raise errors.QubesDaemonCommunicationError("malformed error reply from the daemon")
        exc_type, _traceback, fmt, *args = fields[:-1]
        raise exception_from_fields(exc_type, fmt, args)
    raise errors.QubesDaemonCommunicationError("invalid reply from the daemon")


class Event(NamedTuple):
    """One event of ``admin.Events``; ``subject`` is ``None`` for the app itself (dom0-wide)."""

    subject: str | None
    name: str
    kwargs: dict[str, str]


class EventParser:
    """Incremental parser of an ``admin.Events`` reply stream.

    Feed it bytes as they arrive; it returns the complete events.  An error
    reply (``2\\0...``) in place of the stream raises its exception once the
    stream has ended (:meth:`close`).
    """

    MAX_BUFFER = 1 << 20

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error = False

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        if len(self._buf) > self.MAX_BUFFER:
            raise errors.QubesDaemonCommunicationError("event too large")
        if self._error:
            return []
        events = []
        while len(self._buf) >= 2:
            if self._buf.startswith(EXCEPTION):
                self._error = True
                return events
            if not self._buf.startswith(EVENT):
                raise errors.QubesDaemonCommunicationError("invalid event stream from the daemon")
            parsed = self._parse_one()
            if parsed is None:
                break
            event, used = parsed
            del self._buf[:used]
            events.append(event)
        return events

    def _parse_one(self) -> tuple[Event, int] | None:
        """One complete event at the start of the buffer, or None if it has not all arrived."""
        pos = 2
        fields: list[bytes] = []
        while True:
            end = self._buf.find(b"\0", pos)
            if end < 0:
                return None
            fields.append(bytes(self._buf[pos:end]))
            pos = end + 1
            # subject and event name come first; after them, an empty key ends the event
            if len(fields) >= 3 and len(fields) % 2 == 1 and fields[-1] == b"":
                break
        subject, name, *pairs = fields[:-1]
        kwargs = {pairs[i].decode("utf-8", "replace"): pairs[i + 1].decode("utf-8", "replace")
                  for i in range(0, len(pairs), 2)}
        return Event(subject.decode("utf-8", "replace") or None,
                     name.decode("utf-8", "replace"), kwargs), pos

    def close(self) -> None:
        """The stream ended: raise if it was an error reply or stopped mid-event."""
        if self._error:
            parse_reply(bytes(self._buf))
        if self._buf:
            raise errors.QubesDaemonCommunicationError("event stream ended mid-event")
