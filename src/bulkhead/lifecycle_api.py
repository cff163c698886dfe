"""The contract between qube definitions and the machinery that runs them.

The qube classes (:mod:`bulkhead.vm`) own properties, events and validation;
the :class:`Lifecycle` owns disks, machines and guest agents.  The qube
classes call it and fire events around each call (``domain-pre-start``,
``domain-start``, ``domain-shutdown``...).  The lifecycle calls back
:meth:`LifecycleListener.domain_stopped` whenever a machine goes away, however
it went (shutdown, kill, crash), after the qube's volumes were committed or
discarded.

:class:`bulkhead.lifecycle.QemuLifecycle` is the real implementation; unit
tests of pure logic may use a fake that implements this Protocol.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .backend.base import ExitReason, PowerState
from .storage.pool import Volume, VolumeConfig

if TYPE_CHECKING:  # pragma: no cover
    from .vm.qubesvm import QubesVM


class LifecycleListener(Protocol):
    def domain_stopped(self, vm: "QubesVM", reason: ExitReason) -> None:
        """The machine of ``vm`` is gone and its volumes are stopped."""


class Lifecycle(Protocol):
    listener: LifecycleListener | None

    def describe(self) -> str:
        """One line on the engine and acceleration in use (``bulkhead info``)."""

    # --- storage -----------------------------------------------------------
    def volume(self, vm: "QubesVM", name: str) -> Volume:
        """The Volume object for ``vm``'s volume ``name`` (from ``vm.volume_config``)."""

    async def create_volumes(self, vm: "QubesVM") -> None:
        """Create every volume of a newly defined qube on disk."""

    async def remove_volumes(self, vm: "QubesVM") -> None:
        """Delete every volume of a removed qube (it must be halted)."""

    async def clone_volumes(self, src: "QubesVM", dst: "QubesVM") -> None:
        """Make ``dst``'s persistent volumes copies of ``src``'s (qvm-clone)."""

    async def resize_volume(self, vm: "QubesVM", name: str, size: int) -> None:
        """Grow ``vm``'s volume ``name`` to ``size`` bytes; live if the qube runs."""

    # --- power -------------------------------------------------------------
    def power_state(self, vm: "QubesVM") -> PowerState: ...

    async def start(self, vm: "QubesVM") -> None:
        """Start volumes, launch the machine, wait for the guest agent; raise on failure
        (leaving nothing running and no volume dirty)."""

    async def shutdown(self, vm: "QubesVM", force: bool = False, wait: bool = False,
                       timeout: float | None = None) -> None:
        """Ask the guest to shut down (agent, then ACPI, then kill after ``timeout``).
        With ``wait``, return only once it is halted."""

    async def kill(self, vm: "QubesVM") -> None: ...

    async def pause(self, vm: "QubesVM") -> None: ...

    async def unpause(self, vm: "QubesVM") -> None: ...

    async def adopt(self, vm: "QubesVM") -> bool:
        """At daemon start: re-attach to ``vm``'s machine if a previous daemon left it
        running; otherwise settle its volumes.  True if it is running."""

    def start_lock(self, vm: "QubesVM") -> asyncio.Lock:
        """Serialises power operations on one qube."""


__all__ = ["Lifecycle", "LifecycleListener", "Volume", "VolumeConfig", "PowerState", "ExitReason"]
