"""The Admin API wire format, byte for byte as Qubes' qubesd speaks it.

Request (from the client, which then shuts down its write side)::

    METHOD[+ARG] SOURCE name DEST \\0 PAYLOAD

``+`` is always present from Qubes' client library (``admin.vm.List+``);
``keyword adminvm`` is accepted for ``name dom0``.  Replies::

    0 \\0 BODY                                   success
    2 \\0 EXCEPTION-CLASS \\0 TRACEBACK \\0 MESSAGE \\0   error (traceback empty)
    1 \\0 SUBJECT \\0 EVENT \\0 (KEY \\0 VALUE \\0)* \\0    one event (admin.Events)

Qubes' client formats the error message with ``%`` (the message is a format
string followed by its arguments), so a literal ``%`` is sent as ``%%``.
The subject of an event is the qube's name, or empty for the app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ProtocolError

MAX_HEADER = 256

OK = b"0\0"
EVENT = b"1\0"
ERROR = b"2\0"

_METHOD_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.]{0,127}\Z")
# qrexec's argument alphabet; '+' separates the options of admin.vm.Shutdown.
_ARG_RE = re.compile(r"\A[A-Za-z0-9_.+-]{0,127}\Z")
_SRC_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
_DEST_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")


@dataclass(frozen=True)
class Header:
    method: str
    arg: str
    src: str
    dest: str

    def describe(self) -> str:
        return f"{self.method}+{self.arg} ({self.src} -> {self.dest})"


def parse_header(untrusted_header: bytes) -> Header:
    """Parse ``METHOD+ARG SRC name DEST`` (without its NUL); ProtocolError otherwise.

    Only the shape and the alphabet are checked here; whether the method
    exists and the destination is a qube is the server's next step.
    """
    if len(untrusted_header) > MAX_HEADER:
        raise ProtocolError(f"request header longer than {MAX_HEADER} bytes")
    try:
        untrusted_text = untrusted_header.decode("ascii", "strict")
    except UnicodeDecodeError:
        raise ProtocolError("request header is not ASCII") from None
    untrusted_parts = untrusted_text.split(" ")
    if len(untrusted_parts) != 4:
        raise ProtocolError("request header must be 'METHOD+ARG SOURCE name DEST'")
    untrusted_meth_arg, untrusted_src, untrusted_dest_type, untrusted_dest = untrusted_parts
    if untrusted_dest_type == "keyword" and untrusted_dest == "adminvm":
        untrusted_dest_type, untrusted_dest = "name", "dom0"
    if untrusted_dest_type != "name":
        raise ProtocolError("only an explicit destination name is supported")
    untrusted_method, _, untrusted_arg = untrusted_meth_arg.partition("+")
    if not _METHOD_RE.match(untrusted_method):
        raise ProtocolError("invalid method name")
    if not _ARG_RE.match(untrusted_arg):
        raise ProtocolError("invalid characters in the argument")
    if not _SRC_RE.match(untrusted_src):
        raise ProtocolError("invalid source")
    if not _DEST_RE.match(untrusted_dest):
        raise ProtocolError("invalid destination")
    return Header(method=untrusted_method, arg=untrusted_arg, src=untrusted_src,
                  dest=untrusted_dest)


def _no_nul(text: str) -> str:
    # A NUL inside a field would end it early and desynchronise the reader.
    return text.replace("\0", "\\0")


def encode_reply(body: str | bytes | None) -> bytes:
    if body is None:
        return OK
    if isinstance(body, str):
        body = body.encode("utf-8")
    return OK + body


def escape_format(message: str) -> str:
    """Qubes' client does ``message % args``: a literal % must be doubled."""
    return message.replace("%", "%%")


def encode_error(exc: BaseException) -> bytes:
    name = type(exc).__name__
    message = escape_format(_no_nul(str(exc)))
    return ERROR + name.encode("ascii") + b"\0" + b"\0" + message.encode("utf-8") + b"\0"


def encode_event(subject: str, event: str, kwargs: Mapping[str, Any]) -> bytes:
    parts = [EVENT, _no_nul(subject).encode("utf-8"), b"\0", _no_nul(event).encode("utf-8"), b"\0"]
    for key, value in kwargs.items():
        parts += [_no_nul(str(key)).encode("utf-8"), b"\0",
                  _no_nul(event_value(value)).encode("utf-8"), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def event_value(value: Any) -> str:
    """How an event argument is spelt: qubes and labels by name, None as ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)
