"""The App: the client's view of the whole system, in the shape of Qubes' ``qubesadmin.Qubes``.

``App(Connection(...))`` gives ``domains``, ``labels``, ``pools``, the global
properties as attributes (``app.default_netvm``, through ``admin.property.*``),
and the operations that make qubes: :meth:`add_new_vm` and :meth:`clone_vm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .. import errors
from .collections import Label, LabelCollection, PoolCollection, VMCollection
from .connection import Connection, EventStream
from .holder import PropertyHolder
from .vm import VM

if TYPE_CHECKING:  # pragma: no cover
    import logging


def _log() -> logging.Logger:
    import logging  # only clone_vm logs: the other tools need not import logging
    return logging.getLogger("bulkhead.client")

#: Properties that admin.vm.Create sets, or that identify a qube: never copied by a clone.
_NOT_CLONED = frozenset({"name", "qid", "template", "label", "uuid", "installed_by_rpm",
                         "klass", "xid", "stubdom_xid", "start_time"})


class App(PropertyHolder):
    """The system seen through the Admin API."""

    _method_prefix = "admin.property."

    def __init__(self, connection: Connection | None = None) -> None:
        self._connection = connection if connection is not None else Connection()
        super().__init__(self, "dom0")
        self._domains = VMCollection(self)
        self._labels = LabelCollection(self)
        self._pools = PoolCollection(self)
        #: when True (qvm-ls), the properties of every qube are fetched in one
        #: GetAllOfAll call (see VMCollection.prefetched_properties), the app's in
        #: one GetAll, and the power state comes from the listing
        self._cache_enabled = False

    # --- plumbing ---------------------------------------------------------------
    @property
    def connection(self) -> Connection:
        return self._connection

    @property
    def cache_enabled(self) -> bool:
        return self._cache_enabled

    @cache_enabled.setter
    def cache_enabled(self, value: bool) -> None:
        self._cache_enabled = bool(value)

    def call(self, dest: str, method: str, arg: str | None = None, payload: bytes = b"") -> bytes:
        """One Admin API call; the reply body, or the daemon's exception raised."""
        return self._connection.call(dest, method, arg, payload)

    def events(self, dest: str = "dom0") -> EventStream:
        return self._connection.events(dest)

    def __str__(self) -> str:
        return "dom0"

    # --- collections ----------------------------------------------------------
    @property
    def domains(self) -> VMCollection:
        return self._domains

    @property
    def labels(self) -> LabelCollection:
        return self._labels

    @property
    def pools(self) -> PoolCollection:
        return self._pools

    def get_label(self, label: str | int) -> Label:
        """A label by name, or by index; raises KeyError."""
        name = str(label)
        if name in self._labels:
            return self._labels.get_blind(name)
        if name.isdigit():
            for candidate in self._labels.values():
                if candidate.index == int(name):
                    return candidate
        raise KeyError(label)

    @staticmethod
    def get_vm_class(clsname: str) -> str:
        """Qubes' client identifies classes by name; so do we (the daemon checks them)."""
        return clsname

    def list_vmclass(self) -> list[str]:
        return sorted(n for n in self.call("dom0", "admin.vmclass.List").decode().splitlines() if n)

    # --- making qubes ---------------------------------------------------------
    def add_new_vm(self, cls: str | type, name: str, label: str | Label,
                   template: str | VM | None = None, pool: str | None = None,
                   pools: dict[str, str] | None = None) -> VM:
        """Create a qube (``admin.vm.Create.CLASS``, or ``CreateInPool`` with a pool).

        The template is the call's argument; the payload is
        ``name=NAME label=LABEL`` plus ``pool=P`` or ``pool:VOLUME=P ...``.
        """
        if not isinstance(cls, str):
            cls = cls.__name__
        if pool and pools:
            raise ValueError("only one of pool= and pools= can be used")
        method = "admin.vm.Create." + cls
        payload = f"name={name} label={label}"
        if pool:
            payload += f" pool={pool}"
            method = "admin.vm.CreateInPool." + cls
        if pools:
            payload += "".join(f" pool:{vol}={p}" for vol, p in sorted(pools.items()))
            method = "admin.vm.CreateInPool." + cls
        self.call("dom0", method, str(template) if template is not None else None,
                  payload.encode("utf-8"))
        self._domains.clear_cache()
        return self._domains[name]

    def clone_vm(self, src_vm: str | VM, new_name: str, new_cls: str | None = None,
                 pool: str | None = None, pools: dict[str, str] | None = None,
                 ignore_errors: bool = False, ignore_volumes: Iterable[str] = ()) -> VM:
        """Make ``new_name`` a copy of ``src_vm``, as Qubes' client does it.

        Create the qube (same template and label), copy the properties that
        are not at their default, the tags (but ``created-by-*``) and the
        features, then copy each persistent (``save_on_stop``) volume with
        ``admin.vm.volume.CloneFrom``/``CloneTo``.  On failure the new qube
        is removed again.
        """
        if pool and pools:
            raise ValueError("only one of pool= and pools= can be used")
        src = self._domains[src_vm] if isinstance(src_vm, str) else src_vm
        ignore = set(ignore_volumes)
        if new_cls is None:
            new_cls = src.klass
        template = getattr(src, "template", None)
        if pool is None and not pools:
            pools = self._pools_of(src, ignore)
        dst = self.add_new_vm(new_cls, new_name, str(src.label), template, pool=pool, pools=pools)
        try:
            self._copy_metadata(src, dst, ignore_errors)
            for name, dst_volume in sorted(dst.volumes.items()):
                if name in ignore or not dst_volume.save_on_stop:
                    continue
                _log().info("cloning volume %s of %s", name, src.name)
                dst_volume.clone_from(src.volumes[name])
        except (errors.QubesException, KeyError):
            try:
                del self._domains[dst.name]
            except errors.QubesException as e:  # pragma: no cover - best effort
                _log().error("could not remove the partial clone %s: %s", dst.name, e)
            raise
        return dst

    def _pools_of(self, src: VM, ignore: set[str]) -> dict[str, str] | None:
        """The pools of ``src``'s persistent volumes that differ from the defaults."""
        pools: dict[str, str] = {}
        for name, volume in sorted(src.volumes.items()):
            if name in ignore or not volume.save_on_stop:
                continue
            try:
                default = str(getattr(self, "default_pool_" + name))
            except (AttributeError, errors.QubesException):
                default = volume.pool
            if default != volume.pool:
                pools[name] = volume.pool
        return pools or None

    @staticmethod
    def _copy_metadata(src: VM, dst: VM, ignore_errors: bool) -> None:
        def attempt(what: str, action: Any) -> None:
            try:
                action()
            except errors.QubesException as e:
                _log().error("failed to copy %s to %s: %s", what, dst.name, e)
                if not ignore_errors:
                    raise

        for prop in src.property_list():
            if prop in _NOT_CLONED or src.property_is_default(prop):
                continue
            try:
                value = src.get_property(prop)
            except errors.QubesNoSuchPropertyError:
                continue
            if value is not AttributeError:
                attempt(f"property {prop}", lambda: dst.set_property(prop, value))
        for tag in src.tags:
            if not tag.startswith("created-by-"):
                attempt(f"tag {tag}", lambda: dst.tags.add(tag))
        for feature, value in src.features.items():
            attempt(f"feature {feature}", lambda: dst.features.__setitem__(feature, value))
