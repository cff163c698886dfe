"""Identity of the daemon's named objects (qubes, labels, pools) on the client side."""

from __future__ import annotations


class Named:
    """An object the daemon knows by name: equal to others of its kind, and to
    the plain name, with the same name; ordered and hashed by name."""

    name: str

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, type(self)):
            return self.name == other.name
        if isinstance(other, str):
            return self.name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __lt__(self, other: "Named") -> bool:
        return self.name < other.name
