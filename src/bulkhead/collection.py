"""The collection of qubes: by name, qid and uuid; qid allocation.

Adding fires ``domain-add`` on the app and removing fires
``domain-pre-delete`` (handlers may refuse) then ``domain-delete``, each with
``vm=``; the store persists on these events.
"""

from __future__ import annotations

import uuid as uuid_mod
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import QubesException, QubesValueError, QubesVMNotFoundError
from .vm.base import MAX_QID

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .vm.base import BaseVM


class VMCollection:
    def __init__(self, app: "App") -> None:
        self.app = app
        self._by_name: dict[str, "BaseVM"] = {}
        self._by_qid: dict[int, "BaseVM"] = {}

    def __getitem__(self, key: Any) -> "BaseVM":
        vm = self.get(key)
        if vm is None:
            raise QubesVMNotFoundError(str(key))
        return vm

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, str):
            if key.startswith("uuid:"):
                return self._by_uuid(key[5:], default)
            return self._by_name.get(key, default)
        if isinstance(key, int) and not isinstance(key, bool):
            return self._by_qid.get(key, default)
        if isinstance(key, uuid_mod.UUID):
            return self._by_uuid(str(key), default)
        name = getattr(key, "name", None)
        if isinstance(name, str) and self._by_name.get(name) is key:
            return key
        return default

    def _by_uuid(self, text: str, default: Any) -> Any:
        for vm in self._by_name.values():
            if vm.uuid == text:
                return vm
        return default

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator["BaseVM"]:
        return iter(sorted(self._by_name.values(), key=lambda vm: vm.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    # --- changes ------------------------------------------------------------------
    def add(self, vm: "BaseVM") -> "BaseVM":
        if vm.name in self._by_name:
            raise QubesValueError(f"VM {vm.name} already exists")
        if vm.qid in self._by_qid:
            raise QubesValueError(f"qid {vm.qid} is already used by {self._by_qid[vm.qid].name}")
        self._by_name[vm.name] = vm
        self._by_qid[vm.qid] = vm
        vm.events_enabled = self.app.events_enabled
        self.app.fire_event("domain-add", vm=vm)
        return vm

    def remove(self, vm: "BaseVM") -> None:
        if self._by_name.get(vm.name) is not vm:
            raise QubesVMNotFoundError(vm.name)
        self.app.fire_event("domain-pre-delete", pre_event=True, vm=vm)
        del self._by_name[vm.name]
        del self._by_qid[vm.qid]
        self.app.fire_event("domain-delete", vm=vm)
        vm.events_enabled = False

    # In-memory only, no event: to undo an add or a remove whose change could not be
    # persisted, so that memory and store agree again.
    def forget(self, vm: "BaseVM") -> None:
        if self._by_name.get(vm.name) is vm:
            del self._by_name[vm.name]
            self._by_qid.pop(vm.qid, None)
        vm.events_enabled = False

    def restore(self, vm: "BaseVM") -> None:
        self._by_name[vm.name] = vm
        self._by_qid[vm.qid] = vm
        vm.events_enabled = self.app.events_enabled

    def new_qid(self, reserved: Iterable[int] = ()) -> int:
        """The lowest free qid (dom0 has 0)."""
        taken = set(self._by_qid) | set(reserved)
        for qid in range(1, MAX_QID + 1):
            if qid not in taken:
                return qid
        raise QubesException("No unused qids left")
