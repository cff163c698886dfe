"""AdminVM: dom0, the administrative domain.

It is the daemon's own host side: always running, with no volumes of its own
and no machine to start or stop.  Its qid is 0 and its name ``dom0``.
"""

from __future__ import annotations

from typing import Any

from ..errors import QubesVMError
from ..properties import VMProperty
from .base import BaseVM
from .qubesvm import setter_default_dispvm

ADMINVM_UUID = "00000000-0000-0000-0000-000000000000"


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


class AdminVM(BaseVM):
    icon_family = "adminvm"
    updateable_class = True

    default_dispvm = VMProperty(
        vmclass=("AppVM", "StandaloneVM"), allow_none=True,
        default=lambda vm: vm.app.default_dispvm, setter=setter_default_dispvm,
        doc="The disposable template used for disposables started from dom0.")

    def get_power_state(self) -> str:
        return "Running"

    async def start(self) -> None:
        raise QubesVMError(self, "Cannot start Dom0 fake domain!")

    async def shutdown(self, force: bool = False, wait: bool = False,
                       timeout: float | None = None) -> None:
        raise QubesVMError(self, "Cannot shutdown Dom0 fake domain!")

    async def kill(self) -> None:
        raise QubesVMError(self, "Cannot kill Dom0 fake domain!")

    async def pause(self) -> None:
        raise QubesVMError(self, "Cannot pause Dom0 fake domain!")

    async def unpause(self) -> None:
        raise QubesVMError(self, "Cannot unpause Dom0 fake domain!")

    def current_state(self) -> dict[str, Any]:
        info = _meminfo()
        total = info.get("MemTotal", 0)
        return {
            "mem": total - info.get("MemAvailable", total),
            "mem_static_max": total,
            "cputime": 0,
            "power_state": "Running",
        }
