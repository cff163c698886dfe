"""The collections an App exposes: qubes, labels, pools.

Each is loaded lazily from one list call (``admin.vm.List``, ``admin.label.List``,
``admin.pool.List``) and cached until :meth:`clear_cache`; lookups of a name
that is not listed raise KeyError, which tools turn into
``no such domain: 'x'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generic, Iterator, TypeVar

from .. import errors
from .storage import Pool
from .vm import VM
from .named import Named

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

T = TypeVar("T")

#: Bulkhead's method answering every qube's GetAll at once (see bulkhead.api.admin_props)
GET_ALL_OF_ALL = "bulkhead.vm.property.GetAllOfAll"


class Label(Named):
    """A label: a name (``red``), an index and a colour (``0xcc0000``)."""

    def __init__(self, app: "App", name: str) -> None:
        self.app = app
        self.name = name
        self._color: str | None = None
        self._index: int | None = None


    @property
    def color(self) -> str:
        if self._color is None:
            self._color = self.app.call("dom0", "admin.label.Get", self.name).decode("ascii")
        return self._color

    @property
    def index(self) -> int:
        if self._index is None:
            self._index = int(self.app.call("dom0", "admin.label.Index", self.name))
        return self._index


class NamedCollection(Generic[T]):
    """Objects listed one name per line by ``list_method`` (labels, pools)."""

    def __init__(self, app: "App", list_method: str, factory: Callable[["App", str], T]) -> None:
        self.app = app
        self._list_method = list_method
        self._factory = factory
        self._names: list[str] | None = None
        self._objects: dict[str, T] = {}

    def clear_cache(self) -> None:
        self._names = None

    def _refresh(self) -> list[str]:
        if self._names is None:
            body = self.app.call("dom0", self._list_method)
            self._names = [n for n in body.decode("ascii").splitlines() if n]
        return self._names

    def get_blind(self, name: str) -> T:
        """The object for ``name`` without checking that it exists."""
        if name not in self._objects:
            self._objects[name] = self._factory(self.app, name)
        return self._objects[name]

    def __getitem__(self, name: str) -> T:
        if name not in self:
            raise KeyError(name)
        return self.get_blind(name)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._refresh()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._refresh()))

    def keys(self) -> list[str]:
        return list(self._refresh())

    def values(self) -> list[T]:
        return [self.get_blind(n) for n in self._refresh()]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self.get_blind(n)) for n in self._refresh()]


class LabelCollection(NamedCollection[Label]):
    def __init__(self, app: "App") -> None:
        super().__init__(app, "admin.label.List", Label)


class PoolCollection(NamedCollection[Pool]):
    def __init__(self, app: "App") -> None:
        super().__init__(app, "admin.pool.List", Pool)


class VMCollection:
    """All qubes, from ``admin.vm.List``: one line per qube, ``NAME class=C state=S [k=v ...]``.

    When the app caches (qvm-ls), the properties of every qube come in one
    ``bulkhead.vm.property.GetAllOfAll`` call (see :meth:`prefetched_properties`).
    """

    def __init__(self, app: "App") -> None:
        self.app = app
        self._listing: dict[str, dict[str, str]] | None = None
        self._objects: dict[str, "VM"] = {}
        #: qube -> property -> its GetAll text, from GetAllOfAll; None until asked
        self._prefetched: dict[str, dict[str, str]] | None = None
        #: the daemon refused GetAllOfAll (Qubes' qubesd has no such method)
        self._no_bulk = False

    def clear_cache(self) -> None:
        self._listing = None
        self._prefetched = None

    def refresh(self) -> dict[str, dict[str, str]]:
        """The listing, fetched if not cached: name -> {"class": ..., "state": ...}."""
        if self._listing is None:
            body = self.app.call("dom0", "admin.vm.List")
            listing: dict[str, dict[str, str]] = {}
            for line in body.decode("ascii").splitlines():
                if not line.strip():
                    continue
                name, *props = line.split(" ")
                listing[name] = dict(p.split("=", 1) for p in props if "=" in p)
            self._listing = listing
            # a qube that is gone or changed class must not be served from the cache
            for name, vm in list(self._objects.items()):
                info = listing.get(name)
                if info is None or (vm._klass is not None and info.get("class") != vm._klass):
                    del self._objects[name]
                elif vm._klass is None:
                    vm._klass = info.get("class")
        return self._listing

    def prefetched_properties(self, name: str) -> dict[str, str] | None:
        """``name``'s properties (name -> GetAll text, see :func:`.holder._split_get_all`),
        from one GetAllOfAll call for every qube, made at the first ask after each
        :meth:`clear_cache`.

        Each qube's properties are handed out once (a qube that clears its cache
        asks the daemon again).  None if the daemon does not have the method, or
        did not list ``name``: the caller then makes its own GetAll.
        """
        if self._prefetched is None:
            self._prefetched = {} if self._no_bulk else self._fetch_all_properties()
        return self._prefetched.pop(name, None)

    def forget_prefetched(self) -> None:
        """Drop what GetAllOfAll brought and was not read yet (a change made it stale)."""
        self._prefetched = None

    def _fetch_all_properties(self) -> dict[str, dict[str, str]]:
        try:
            body = self.app.call("dom0", GET_ALL_OF_ALL)
        except errors.QubesDaemonAccessError:
            self._no_bulk = True  # an empty reply: qrexec's policy, or an older daemon
            return {}
        except errors.QubesDaemonCommunicationError:
            raise  # not a refusal: falling back would fail the same way
        except (errors.QubesException, errors.ProtocolError, errors.PermissionDenied):
            self._no_bulk = True  # "no such method"
            return {}
        result: dict[str, dict[str, str]] = {}
        current_vm = ""
        current: dict[str, str] = {}
        for line in body.decode("utf-8").split("\n"):
            if not line:
                continue
            parts = line.split(" ", 2)
            if len(parts) != 3:
                raise errors.QubesDaemonCommunicationError(
                    f"malformed {GET_ALL_OF_ALL} line {line[:80]!r}")
            vm, prop, text = parts
            if vm != current_vm:  # a qube's lines come together
                current_vm = vm
                current = result.setdefault(vm, {})
            current[prop] = text
        return result

    def listed(self, name: str) -> dict[str, str] | None:
        """What ``admin.vm.List`` said about ``name`` (class, state), if it is cached."""
        return (self._listing or {}).get(name)

    def get_blind(self, name: str) -> "VM":
        """The VM object for ``name`` without checking that it exists."""
        vm = self._objects.get(name)
        if vm is None:
            info = self.listed(name) or {}
            vm = VM(self.app, name, klass=info.get("class"))
            self._objects[name] = vm
        return vm

    def __getitem__(self, name: object) -> "VM":
        key = getattr(name, "name", name)
        if not isinstance(key, str) or key not in self:
            raise KeyError(key)
        return self.get_blind(key)

    def __contains__(self, name: object) -> bool:
        return getattr(name, "name", name) in self.refresh()

    def __iter__(self) -> Iterator["VM"]:
        for name in sorted(self.refresh()):
            yield self.get_blind(name)

    def __len__(self) -> int:
        return len(self.refresh())

    def keys(self) -> list[str]:
        return sorted(self.refresh())

    def values(self) -> list["VM"]:
        return list(self)

    def __delitem__(self, name: object) -> None:
        """Remove the qube (``admin.vm.Remove``); it must be halted."""
        key = str(getattr(name, "name", name))
        self.app.call(key, "admin.vm.Remove")
        self._objects.pop(key, None)
        self.clear_cache()

    def require(self, name: str) -> "VM":
        """Like ``[name]`` but raising QubesVMNotFoundError, for library users."""
        try:
            return self[name]
        except KeyError:
            raise errors.QubesVMNotFoundError(name) from None
