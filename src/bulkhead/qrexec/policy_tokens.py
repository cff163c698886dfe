"""The qube specifications of a qrexec policy line, and where each may appear.

A policy line names qubes with *tokens*: a plain qube name, ``@anyvm``,
``@adminvm`` (``dom0`` is its alias), ``@default``, ``@dispvm``,
``@dispvm:NAME``, ``@dispvm:@tag:TAG``, ``@tag:TAG`` and ``@type:TYPE``.
Not every token makes sense everywhere; Qubes' table (qubes-core-qrexec,
"multifile policy") says which, and a token where it is not allowed is a
syntax error, not a line that silently never matches:

====================  ======  ======  ==========  ===============
token                 source  target  target= /   what the caller
                                      default_    asks for
                                      target=
====================  ======  ======  ==========  ===============
a qube name           yes     yes     yes         yes
``@adminvm``/dom0     yes     yes     yes         yes
``@anyvm``            yes     yes     no          no
``@default``          no      yes     no          yes
``@dispvm``           no      yes     yes         yes
``@dispvm:NAME``      yes     yes     yes         yes
``@dispvm:@tag:T``    yes     yes     no          no
``@tag:T``            yes     yes     no          no
``@type:T``           yes     yes     no          no
====================  ======  ======  ==========  ===============

Bulkhead is stricter than Qubes in one respect: ``@type:`` must name one of
the qube classes (a typo would otherwise make a rule that never matches),
and names and tags must be valid qube names and tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    NAME = "name"
    ADMINVM = "@adminvm"
    ANYVM = "@anyvm"
    DEFAULT = "@default"
    DISPVM = "@dispvm"
    DISPVM_TEMPLATE = "@dispvm:"
    DISPVM_TAG = "@dispvm:@tag:"
    TAG = "@tag:"
    TYPE = "@type:"


class Context(str, Enum):
    """Where a token stands: which column or parameter of the line."""

    SOURCE = "source"
    TARGET = "target"
    REDIRECT = "target= / default_target="
    INTENDED = "requested target"


_ALLOWED: dict[Context, frozenset[Kind]] = {
    Context.SOURCE: frozenset({Kind.NAME, Kind.ADMINVM, Kind.ANYVM, Kind.DISPVM_TEMPLATE,
                               Kind.DISPVM_TAG, Kind.TAG, Kind.TYPE}),
    Context.TARGET: frozenset(Kind),
    Context.REDIRECT: frozenset({Kind.NAME, Kind.ADMINVM, Kind.DISPVM, Kind.DISPVM_TEMPLATE}),
    Context.INTENDED: frozenset({Kind.NAME, Kind.ADMINVM, Kind.DEFAULT, Kind.DISPVM,
                                 Kind.DISPVM_TEMPLATE}),
}

#: the classes ``@type:`` may name (Qubes' qube classes)
QUBE_CLASSES = frozenset({"AdminVM", "AppVM", "TemplateVM", "StandaloneVM", "DispVM"})

#: a qube name, as Bulkhead validates it everywhere (vm/base.py)
NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
#: a tag, as vm/base.py validates it
TAG_RE = re.compile(r"\A[a-zA-Z0-9_-]{1,128}\Z")

ADMINVM_NAME = "dom0"


class TokenError(ValueError):
    """The text is not a valid token here; the message says why (no file, no line)."""


@dataclass(frozen=True)
class Token:
    """One qube specification: its kind and, for names and prefixed tokens, the value.

    ``str(token)`` gives the canonical text (``dom0`` becomes ``@adminvm``).
    """

    kind: Kind
    value: str = ""

    def __str__(self) -> str:
        if self.kind is Kind.NAME:
            return self.value
        if self.kind in (Kind.ADMINVM, Kind.ANYVM, Kind.DEFAULT, Kind.DISPVM):
            return self.kind.value
        return self.kind.value + self.value


def parse_token(text: str, context: Context) -> Token:
    """The token ``text`` stands for, if it is valid in ``context`` (TokenError otherwise)."""
    token = _classify(text)
    if token.kind not in _ALLOWED[context]:
        raise TokenError(f"{text!r} is not allowed as {context.value}")
    return token


def _classify(text: str) -> Token:
    if text == ADMINVM_NAME or text == Kind.ADMINVM.value:
        return Token(Kind.ADMINVM)
    if not text.startswith("@"):
        if not NAME_RE.match(text):
            raise TokenError(f"{text!r} is not a valid qube name")
        return Token(Kind.NAME, text)
    for kind in (Kind.ANYVM, Kind.DEFAULT, Kind.DISPVM):
        if text == kind.value:
            return Token(kind)
    # the longest prefix first: "@dispvm:@tag:" before "@dispvm:"
    for kind in (Kind.DISPVM_TAG, Kind.DISPVM_TEMPLATE, Kind.TAG, Kind.TYPE):
        if text.startswith(kind.value):
            value = text[len(kind.value):]
            if not value:
                raise TokenError(f"{text!r}: {kind.value} needs a value")
            _check_value(kind, value, text)
            return Token(kind, value)
    raise TokenError(f"{text!r} is not a known @token")


def _check_value(kind: Kind, value: str, text: str) -> None:
    if kind is Kind.DISPVM_TEMPLATE:
        if not NAME_RE.match(value) or value == ADMINVM_NAME:
            raise TokenError(f"{text!r}: {value!r} is not a valid qube name")
    elif kind in (Kind.TAG, Kind.DISPVM_TAG):
        if not TAG_RE.match(value):
            raise TokenError(f"{text!r}: {value!r} is not a valid tag")
    elif kind is Kind.TYPE and value not in QUBE_CLASSES:
        raise TokenError(f"{text!r}: the type must be one of {', '.join(sorted(QUBE_CLASSES))}")
