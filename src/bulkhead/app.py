"""The app: every qube, the global settings, the pools, and who runs the machines.

:class:`App` is Qubes' ``qubes.Qubes`` for Bulkhead: the one object the
daemon holds.  It owns

- ``domains``: the qubes (:class:`bulkhead.collection.VMCollection`);
- the global properties, with Qubes' names (``default_template``,
  ``default_netvm``, ``default_dispvm``, ``default_kernel``,
  ``default_pool``, ``default_qrexec_timeout``, ``clockvm``, ``updatevm``...);
- ``pools``: pool name -> :class:`bulkhead.storage.pool.Pool`;
- ``lifecycle``: the :class:`bulkhead.lifecycle_api.Lifecycle` that runs the
  machines, injected (the daemon passes QemuLifecycle, tests a fake).  The
  app is its listener: a machine that goes away fires ``domain-shutdown``;
- ``store``: the :class:`bulkhead.store.Store` that persists every change;
- its *observers*: callables ``(subject, event, kwargs)`` that see every
  event fired on any qube or on the app (``admin.Events`` streams).

Creating and removing qubes are coroutines here (:meth:`App.create_vm`,
:meth:`App.remove_vm`) because they create and delete volumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
import uuid as uuid_mod
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .backend.base import ExitReason
from .collection import VMCollection
from .errors import (QubesPropertyValueError, QubesValueError, QubesVMInUseError,
                     QubesVMNotHaltedError)
from .events import handler
from .labels import LABELS, Label, get_label
from .pools import PoolFactory, PoolRegistry
from .properties import Property, PropertyHolder, VMProperty
from .vm import AdminVM, BaseVM, QubesVM, validate_name, vm_class
from .vm.adminvm import ADMINVM_UUID
from .vm.net import check_default_netvm_change, setter_default_netvm
from .vm.qubesvm import positive_int, setter_default_dispvm, setter_kernel

if TYPE_CHECKING:  # pragma: no cover
    from .config import Paths
    from .lifecycle_api import Lifecycle
    from .store import Store

Observer = Callable[[Any, str, dict[str, Any]], None]

DEFAULT_POOL = "default"
KERNEL_POOL = "linux-kernel"

#: how old vm-kernels' mtime must be before its listing is cached (see installed_kernels)
_KERNELS_SETTLED_NS = 2_000_000_000


def _setter_pool(app: "App", prop: Property, value: str) -> str:
    if value not in app.pools:
        raise QubesPropertyValueError(app, prop.name, value, f"No such storage pool: {value!r}")
    return value


def _default_kernel(app: "App") -> str:
    installed = app.installed_kernels()
    return installed[-1] if installed else ""


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class App(PropertyHolder):
    """The collection of qubes and the global settings (see the module doc)."""

    clockvm = VMProperty(allow_none=True, default=None,
                         doc="The qube whose clock dom0 and the other qubes follow.")
    updatevm = VMProperty(allow_none=True, default=None,
                          doc="The qube that downloads dom0's updates.")
    default_template = VMProperty(vmclass="TemplateVM", allow_none=True, default=None,
                                  doc="The template new AppVMs are based on when none is "
                                      "given.")
    default_netvm = VMProperty(allow_none=True, default=None, setter=setter_default_netvm,
                               doc="The netvm of every qube whose netvm is not set "
                                   "(usually sys-firewall).")
    default_dispvm = VMProperty(vmclass=("AppVM", "StandaloneVM"), allow_none=True,
                                default=None, setter=setter_default_dispvm,
                                doc="The disposable template used when a qube's "
                                    "default_dispvm is not set.")
    default_kernel = Property(default=_default_kernel, setter=setter_kernel,
                              doc="The kernel qubes boot when their kernel is not set "
                                  "(default: the newest installed).")
    default_pool = Property(default=DEFAULT_POOL, setter=_setter_pool,
                            doc="The storage pool new volumes go to.")
    default_pool_root = Property(default=lambda app: app.default_pool, setter=_setter_pool,
                                 doc="The pool of new root volumes (default: default_pool).")
    default_pool_private = Property(default=lambda app: app.default_pool, setter=_setter_pool,
                                    doc="The pool of new private volumes (default: "
                                        "default_pool).")
    default_pool_volatile = Property(default=lambda app: app.default_pool, setter=_setter_pool,
                                     doc="The pool of new volatile volumes (default: "
                                         "default_pool).")
    default_qrexec_timeout = Property(type=int, default=60, setter=positive_int,
                                      doc="Default qrexec_timeout of qubes, in seconds.")
    default_shutdown_timeout = Property(type=int, default=60, setter=positive_int,
                                        doc="Default shutdown_timeout of qubes, in seconds.")
    stats_interval = Property(type=int, default=3, setter=positive_int,
                              doc="Seconds between two reports of admin.vm.Stats.")
    check_updates_vm = Property(type=bool, default=True,
                                doc="Let qubes check for updates and report them to dom0.")

    def __init__(self, paths: "Paths | None" = None, *, lifecycle: "Lifecycle | None" = None,
                 pool_factory: PoolFactory | None = None) -> None:
        super().__init__()
        self.paths = paths
        self.log = logging.getLogger("bulkhead.app")
        self.domains = VMCollection(self)
        self.pools = PoolRegistry(self, pool_factory)
        self.labels: tuple[Label, ...] = LABELS
        self.store: "Store | None" = None
        self.lifecycle: "Lifecycle | None" = None
        self._observers: list[Observer] = []
        # Names and qids of qubes being created (their volumes are being made).
        self._creating: dict[str, int] = {}
        #: vm-kernels, and ((dev, inode, mtime) of it, its listing): see installed_kernels
        self._kernels_dir: str | None = None
        self._kernels_cache: tuple[tuple[int, int, int], tuple[str, ...]] | None = None
        if lifecycle is not None:
            self.set_lifecycle(lifecycle)

    # A property of the app refers to qubes through ``holder.app``.
    @property
    def app(self) -> "App":
        return self

    def __str__(self) -> str:
        return "dom0"

    # --- events: observers see everything -------------------------------------------
    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def observe(self, subject: Any, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        """Every event fired on a qube or on the app comes here once its handlers ran."""
        if self.store is not None and not pre_event:
            # Persisting is part of the change: a failure must reach the caller.
            self.store.on_event(subject, event, kwargs)
        for observer in list(self._observers):
            try:
                observer(subject, event, kwargs)
            except Exception:  # noqa: BLE001 - one bad listener must not break the change
                self.log.exception("event observer failed on %s", event)

    def _forward_event(self, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        self.observe(self, event, pre_event, kwargs)

    # --- persistence ------------------------------------------------------------------
    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """One store transaction around a change (no await may happen inside)."""
        if self.store is None:
            return contextlib.nullcontext()
        return self.store.transaction()

    def save_volume_config(self, vm: BaseVM) -> None:
        if self.store is not None and vm.events_enabled and self.domains.get(vm.name) is vm:
            self.store.save_volume_config(vm)

    # --- the machines -------------------------------------------------------------------
    def set_lifecycle(self, lifecycle: "Lifecycle") -> None:
        self.lifecycle = lifecycle
        lifecycle.listener = self

    def domain_stopped(self, vm: Any, reason: ExitReason) -> None:
        """LifecycleListener: ``vm``'s machine is gone (shutdown, kill, crash...)."""
        try:
            vm.fire_event("domain-shutdown", reason=reason.value)
            vm.fire_event("domain-stopped", reason=reason.value)
        except Exception:  # noqa: BLE001 - called from the lifecycle's machinery
            self.log.exception("handling the stop of %s failed", vm)

    # --- labels and kernels ------------------------------------------------------------
    @staticmethod
    def get_label(value: "Label | str | int") -> Label:
        return get_label(value)

    def installed_kernels(self) -> list[str] | None:
        """Kernel versions installed in vm-kernels, oldest first; None if unknown (no paths).

        Every qube's ``kernel`` default asks (through ``default_kernel``), so
        GetAll of 200 qubes would list the directory 200 times: the listing is
        kept while the directory's inode and mtime are unchanged, once the
        mtime is old enough that a second change in the same clock tick could
        not go unseen.
        """
        if self.paths is None:
            return None
        if self._kernels_dir is None:
            self._kernels_dir = str(self.paths.vm_kernels)  # a Path per call costs more
        kernels_dir = self._kernels_dir
        try:
            st = os.stat(kernels_dir)
        except OSError:
            return []
        if not stat.S_ISDIR(st.st_mode):
            return []
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if self._kernels_cache is not None and self._kernels_cache[0] == key:
            return list(self._kernels_cache[1])
        with os.scandir(kernels_dir) as entries:
            names = sorted((entry.name for entry in entries if entry.is_dir()), key=_natural_key)
        if time.time_ns() - st.st_mtime_ns > _KERNELS_SETTLED_NS:
            self._kernels_cache = (key, tuple(names))
        return names

    # --- first start -------------------------------------------------------------------
    def initialize(self) -> None:
        """Give a new system what every Qubes system has: dom0, the default pool and
        the pool of dom0's qube kernels."""
        if DEFAULT_POOL not in self.pools:
            config = {}
            driver = "file"
            if self.paths is not None:
                config["dir_path"] = str(self.paths.pools / DEFAULT_POOL)
                # As Qubes' installer does: on btrfs or XFS, copies share extents.
                from .storage.reflink_pool import reflink_supported
                if reflink_supported(self.paths.pools / DEFAULT_POOL):
                    driver = "file-reflink"
            self.pools.define(DEFAULT_POOL, driver, config)
        if KERNEL_POOL not in self.pools and self.paths is not None:
            self.pools.define(KERNEL_POOL, "linux-kernel", {"dir_path": str(self.paths.vm_kernels)})
        if "dom0" not in self.domains:
            dom0 = AdminVM(self, name="dom0", qid=0, uuid=ADMINVM_UUID,
                           label=get_label("black"))
            with self.transaction():
                self.domains.add(dom0)

    # --- creating and removing qubes --------------------------------------------------
    async def create_vm(self, klass: str | type[BaseVM], *, name: str, label: Any,
                        template: Any = None, pool: str | None = None,
                        pools: Mapping[str, str] | None = None,
                        tags: tuple[str, ...] = ("created-by-dom0",)) -> QubesVM:
        """Define a qube, create its volumes, then persist it: the qube exists (in the
        store and in ``domains``) only once all of it does."""
        cls = klass if isinstance(klass, type) else vm_class(klass)
        if not issubclass(cls, QubesVM):
            raise QubesValueError(f"Cannot create a qube of class {cls.__name__}")
        validate_name(None, None, name)
        if name in self.domains or name in self._creating:
            raise QubesValueError(f"VM {name} already exists")
        has_template = any(prop.name == "template" for prop in cls.property_list())
        if template is not None and not has_template:
            raise QubesValueError(f"{cls.__name__} cannot be based on template")
        if has_template and template is None:
            template = self.default_template if cls.__name__ == "AppVM" else self.default_dispvm
            if template is None:
                raise QubesValueError(f"No template given for the new {cls.__name__} and no "
                                      f"default set")
        qid = self.domains.new_qid(reserved=self._creating.values())
        self._creating[name] = qid
        try:
            properties: dict[str, Any] = {"name": name, "qid": qid,
                                          "uuid": str(uuid_mod.uuid4()), "label": label}
            if has_template:
                properties["template"] = template
            vm = cls(self, **properties)
            vm.volume_config = cls.volume_layout(vm, pool, pools)
            for tag in tags:
                vm.tags.load(tag)
            if self.lifecycle is not None:
                await self.lifecycle.create_volumes(vm)
            try:
                with self.transaction():
                    self.domains.add(vm)
            except BaseException:
                self.domains.forget(vm)
                await self._remove_volumes(vm)
                raise
        finally:
            del self._creating[name]
        return vm

    async def remove_vm(self, vm: BaseVM) -> None:
        """Remove a halted qube nobody uses, then its volumes (as Qubes: the definition
        goes first; a volume that cannot be removed is logged, not fatal)."""
        if not isinstance(vm, QubesVM):  # that is, dom0
            raise QubesVMInUseError(vm, f"{vm.name!r} cannot be removed")
        lock = self.lifecycle.start_lock(vm) if self.lifecycle is not None else _NoLock()
        async with lock:
            if not vm.is_halted():
                raise QubesVMNotHaltedError(vm)
            if getattr(vm, "installed_by_rpm", False):
                raise QubesVMInUseError(vm, "VM installed by package manager: " + vm.name)
            try:
                with self.transaction():
                    self.domains.remove(vm)
            except BaseException:
                if self.domains.get(vm.name) is None:
                    self.domains.restore(vm)
                raise
            await self._remove_volumes(vm)

    async def _remove_volumes(self, vm: QubesVM) -> None:
        if self.lifecycle is None or not vm.volume_config:
            return
        try:
            await self.lifecycle.remove_volumes(vm)
        except Exception:  # noqa: BLE001 - the qube is gone; leftovers are logged
            self.log.exception("Error while removing the volumes of %r", vm.name)

    # --- rules that span qubes ------------------------------------------------------------
    def users_of(self, vm: BaseVM) -> list[str]:
        """Who refers to ``vm``: ``"work (netvm)"``, ``"global default_netvm"``..."""
        users = []
        for other in self.domains:
            if other is vm:
                continue
            for prop in other.property_list():
                if isinstance(prop, VMProperty) \
                        and other.explicit_properties().get(prop.name) is vm:
                    users.append(f"{other.name} ({prop.name})")
        for prop in self.property_list():
            if isinstance(prop, VMProperty) and getattr(self, prop.name, None) is vm:
                users.append(f"global {prop.name}")
        return users

    @handler("domain-pre-delete")
    def _on_domain_pre_delete(self, event: str, vm: BaseVM) -> None:
        users = self.users_of(vm)
        if users:
            raise QubesVMInUseError(vm, f"Domain is in use: {vm.name!r}; used by: "
                                        + ", ".join(users))

    @handler("property-pre-set:default_netvm")
    def _on_pre_set_default_netvm(self, event: str, name: str, newvalue: Any,
                                  oldvalue: Any = None) -> None:
        check_default_netvm_change(self, newvalue)

    @handler("property-set:default_netvm", "property-reset:default_netvm")
    def _on_set_default_netvm(self, event: str, name: str, **kwargs: Any) -> None:
        # As Qubes: qubes that follow the default see their netvm change too.
        self._announce_default_change("netvm", kwargs.get("oldvalue"))

    @handler("property-set:default_dispvm", "property-reset:default_dispvm")
    def _on_set_default_dispvm(self, event: str, name: str, **kwargs: Any) -> None:
        self._announce_default_change("default_dispvm", kwargs.get("oldvalue"))

    def _announce_default_change(self, prop: str, oldvalue: Any) -> None:
        for vm in self.domains:
            if prop == "netvm" and not getattr(type(vm), "netvm_follows_default", False):
                continue
            if prop in vm.property_names() and vm.property_is_default(prop):
                vm.fire_event("property-reset:" + prop, name=prop, oldvalue=oldvalue)

    def iter_qubes(self) -> Iterator[QubesVM]:
        """Every qube that has a machine (all but dom0)."""
        return (vm for vm in self.domains if isinstance(vm, QubesVM))


class _NoLock(contextlib.AbstractAsyncContextManager):  # type: ignore[type-arg]
    async def __aexit__(self, *exc: Any) -> None:
        return None
