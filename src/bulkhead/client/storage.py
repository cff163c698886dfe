"""Storage as the Admin API shows it: a qube's volumes and the pools they live in.

A :class:`Volume` is addressed as (qube, volume name) and every attribute
comes from ``admin.vm.volume.Info``::

    pool=default
    vid=appvms/work/private
    size=2147483648
    ...

A :class:`Pool` is addressed by name; ``admin.pool.Info`` gives its
``key=value`` configuration (``driver`` among them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from .named import Named

if TYPE_CHECKING:  # pragma: no cover
    from .app import App


def _parse_key_values(body: bytes) -> dict[str, str]:
    info = {}
    for line in body.decode("utf-8").splitlines():
        if line:
            key, _, value = line.partition("=")
            info[key] = value
    return info


class Volume:
    """One volume of one qube (``admin.vm.volume.*`` calls with the volume name as argument)."""

    def __init__(self, app: "App", vm: str, name: str) -> None:
        self.app = app
        self.vm = vm
        self.name = name
        self._info: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Volume {self.vm}:{self.name}>"

    def __lt__(self, other: "Volume") -> bool:
        return (self.vm, self.name) < (other.vm, other.name)

    def _call(self, func: str, payload: bytes = b"") -> bytes:
        return self.app.call(self.vm, "admin.vm.volume." + func, self.name, payload)

    @property
    def info(self) -> dict[str, str]:
        """The ``admin.vm.volume.Info`` fields (fetched once; :meth:`refresh` to fetch again)."""
        if self._info is None:
            self._info = _parse_key_values(self._call("Info"))
        return self._info

    def refresh(self) -> None:
        self._info = None

    def _flag(self, key: str) -> bool:
        return self.info.get(key) == "True"

    @property
    def pool(self) -> str:
        return self.info.get("pool", "")

    @property
    def vid(self) -> str:
        return self.info.get("vid", "")

    @property
    def size(self) -> int:
        return int(self.info.get("size") or 0)

    @property
    def usage(self) -> int:
        return int(self.info.get("usage") or 0)

    @property
    def rw(self) -> bool:
        return self._flag("rw")

    @property
    def source(self) -> str | None:
        return self.info.get("source") or None

    @property
    def save_on_stop(self) -> bool:
        return self._flag("save_on_stop")

    @property
    def snap_on_start(self) -> bool:
        return self._flag("snap_on_start")

    @property
    def ephemeral(self) -> bool:
        return self._flag("ephemeral")

    @property
    def revisions_to_keep(self) -> int:
        return int(self.info.get("revisions_to_keep") or 0)

    def is_outdated(self) -> bool:
        return self._flag("is_outdated")

    @property
    def revisions(self) -> list[str]:
        """Kept revisions, oldest first (``admin.vm.volume.ListSnapshots``)."""
        return [r for r in self._call("ListSnapshots").decode("ascii").splitlines() if r]

    def revert(self, revision: str) -> None:
        self._call("Revert", revision.encode("ascii"))
        self.refresh()

    def resize(self, size: int) -> None:
        """Grow to ``size`` bytes (the daemon refuses to shrink)."""
        self._call("Resize", str(int(size)).encode("ascii"))
        self.refresh()

    def set(self, key: str, value: str) -> None:
        """``admin.vm.volume.Set.KEY`` (``rw``, ``revisions_to_keep``, ``ephemeral``)."""
        self._call("Set." + key, value.encode("ascii"))
        self.refresh()

    def clone_from(self, source: "Volume") -> None:
        """Replace this volume's content with a copy of ``source``'s (qvm-clone).

        As in Qubes: ask the source for a one-time token (``CloneFrom``), hand
        it to the destination (``CloneTo``).
        """
        token = source._call("CloneFrom")
        self._call("CloneTo", token)
        self.refresh()


class Pool(Named):
    """A storage pool (``admin.pool.*`` calls with the pool name as argument)."""

    def __init__(self, app: "App", name: str) -> None:
        self.app = app
        self.name = name
        self._config: dict[str, str] | None = None


    @property
    def config(self) -> dict[str, str]:
        """The ``admin.pool.Info`` fields."""
        if self._config is None:
            self._config = _parse_key_values(self.app.call("dom0", "admin.pool.Info", self.name))
        return self._config

    @property
    def driver(self) -> str:
        return self.config.get("driver", "")

    @property
    def volumes(self) -> list[str]:
        """Volume ids in the pool (``admin.pool.volume.List``)."""
        body = self.app.call("dom0", "admin.pool.volume.List", self.name)
        return [v for v in body.decode("ascii").splitlines() if v]
