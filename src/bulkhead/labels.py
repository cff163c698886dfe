"""Labels: the colour of trust every qube wears.

The eight labels, their indices and colours are Qubes' own: the GUI daemon
draws a qube's window frame in its label's colour, and Qubes' tools name
labels by name (``red``) or index (``1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QubesLabelNotFoundError


@dataclass(frozen=True)
class Label:
    index: int
    color: str  # "0xRRGGBB", as admin.label.Get answers
    name: str

    def __str__(self) -> str:
        return self.name

    @property
    def rgb(self) -> tuple[int, int, int]:
        value = int(self.color, 16)
        return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF

    @property
    def icon(self) -> str:
        return "appvm-" + self.name


LABELS: tuple[Label, ...] = (
    Label(1, "0xcc0000", "red"),
    Label(2, "0xf57900", "orange"),
    Label(3, "0xedd400", "yellow"),
    Label(4, "0x73d216", "green"),
    Label(5, "0x555753", "gray"),
    Label(6, "0x3465a4", "blue"),
    Label(7, "0x75507b", "purple"),
    Label(8, "0x000000", "black"),
)

_BY_NAME = {label.name: label for label in LABELS}
_BY_INDEX = {label.index: label for label in LABELS}


def get_label(value: "Label | str | int") -> Label:
    """The label named ``value``, or with index ``value``; QubesLabelNotFoundError otherwise."""
    if isinstance(value, Label):
        if _BY_INDEX.get(value.index) == value:
            return value
        raise QubesLabelNotFoundError(value.name)
    if isinstance(value, bool):  # bool is an int: never a label
        raise QubesLabelNotFoundError(str(value))
    if isinstance(value, int):
        try:
            return _BY_INDEX[value]
        except KeyError:
            raise QubesLabelNotFoundError(str(value)) from None
    if isinstance(value, str):
        if value in _BY_NAME:
            return _BY_NAME[value]
        if value.isascii() and value.isdigit() and len(value) <= 3:
            try:
                return _BY_INDEX[int(value)]
            except KeyError:
                pass
        raise QubesLabelNotFoundError(value)
    raise QubesLabelNotFoundError(repr(value))
