"""The storage pools the app knows: name -> :class:`bulkhead.storage.pool.Pool`.

A pool is *defined* by a name, a driver and the driver's settings (kept in
the store); its :class:`Pool` object is made on first use by the pool
factory.  The default factory knows the drivers below and imports their
module only then (so the daemon does not import storage code it does not
use); tests pass their own factory, or :meth:`PoolRegistry.inject` ready-made
pool objects.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import QubesPoolNotFoundError, QubesValueError

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .storage.pool import Pool


@dataclass(frozen=True)
class Driver:
    module: str
    classname: str
    #: the settings admin.pool.ListDrivers announces (and admin.pool.Add would accept)
    parameters: tuple[str, ...]


#: driver name -> where its Pool class lives
DRIVERS: dict[str, Driver] = {
    "file": Driver("bulkhead.storage.file_pool", "FilePool",
                   ("dir_path", "name", "revisions_to_keep")),
    "file-reflink": Driver("bulkhead.storage.reflink_pool", "ReflinkPool",
                           ("dir_path", "name", "revisions_to_keep")),
    "linux-kernel": Driver("bulkhead.storage.kernel_pool", "LinuxKernelPool",
                           ("dir_path", "name")),
}

PoolFactory = Callable[[str, str, dict[str, str]], "Pool"]


def default_pool_factory(name: str, driver: str, config: dict[str, str]) -> "Pool":
    """Make the Pool object of a defined pool, importing its driver lazily."""
    try:
        spec = DRIVERS[driver]
    except KeyError:
        raise QubesValueError(f"Unknown storage pool driver {driver!r}") from None
    cls = getattr(importlib.import_module(spec.module), spec.classname)
    return cls(name, **config)


@dataclass
class PoolDefinition:
    name: str
    driver: str
    config: dict[str, str] = field(default_factory=dict)


class PoolRegistry:
    """The app's pools; ``registry[name]`` is the Pool object."""

    def __init__(self, app: "App", factory: PoolFactory | None = None) -> None:
        self.app = app
        self.factory = factory or default_pool_factory
        self._definitions: dict[str, PoolDefinition] = {}
        self._objects: dict[str, "Pool"] = {}

    # --- definitions ----------------------------------------------------------
    def define(self, name: str, driver: str, config: dict[str, str] | None = None,
               persist: bool = True) -> None:
        """Add a pool; ``persist`` writes it to the store (not when loading from it)."""
        if name in self._definitions:
            raise QubesValueError(f"Storage pool {name!r} already exists")
        definition = PoolDefinition(name, driver, dict(config or {}))
        self._definitions[name] = definition
        if persist and self.app.store is not None:
            self.app.store.save_pool(definition)

    def inject(self, pool: "Pool") -> None:
        """Register a ready-made Pool object (tests); not persisted."""
        self._definitions.setdefault(pool.name, PoolDefinition(
            pool.name, getattr(pool, "driver", "") or "unknown",
            {k: str(v) for k, v in getattr(pool, "config", {}).items()}))
        self._objects[pool.name] = pool

    def definition(self, name: str) -> PoolDefinition:
        self.check(name)
        return self._definitions[name]

    def check(self, name: str) -> None:
        if name not in self._definitions:
            raise QubesPoolNotFoundError(f"No such storage pool: {name!r}")

    # --- objects ----------------------------------------------------------------
    def __getitem__(self, name: str) -> "Pool":
        self.check(name)
        pool = self._objects.get(name)
        if pool is None:
            definition = self._definitions[name]
            pool = self.factory(name, definition.driver, dict(definition.config))
            self._objects[name] = pool
        return pool

    def __contains__(self, name: object) -> bool:
        return name in self._definitions

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._definitions))

    def __len__(self) -> int:
        return len(self._definitions)

    def keys(self) -> list[str]:
        return sorted(self._definitions)

    def revisions_to_keep(self, name: str) -> int:
        """The pool's revisions_to_keep setting (1 if it has none)."""
        definition = self._definitions.get(name)
        value: Any = definition.config.get("revisions_to_keep") if definition else None
        if value is None and name in self._objects:
            value = getattr(self._objects[name], "config", {}).get("revisions_to_keep")
        try:
            return max(0, int(value)) if value is not None else 1
        except (TypeError, ValueError):
            return 1

    @staticmethod
    def drivers() -> dict[str, tuple[str, ...]]:
        return {name: spec.parameters for name, spec in sorted(DRIVERS.items())}
