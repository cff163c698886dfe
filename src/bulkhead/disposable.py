"""Disposable qubes made on demand, destroyed with all their data when done.

A disposable is a :class:`~bulkhead.vm.dispvm.DispVM` of a disposable template
(an AppVM with ``template_for_dispvms``): its root and private are snapshots of
the template's, its volatile fresh (:func:`bulkhead.vm.volumes.dispvm_layout`),
so nothing it does outlives it.  It is named ``dispN`` (Qubes' ``dispNNNN``),
N the lowest number no qube uses, and carries ``auto_cleanup``: when it halts,
its definition and every volume go.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import QubesException, QubesValueError

log = logging.getLogger(__name__)

MAX_DISPID = 9999


def _free_name(app: Any) -> str:
    for n in range(1, MAX_DISPID + 1):
        name = f"disp{n}"
        if app.domains.get(name) is None and name not in getattr(app, "_creating", {}):
            return name
    raise QubesException(f"no free disposable name: {MAX_DISPID} disposables exist")


async def create_disposable(app: Any, base: Any) -> Any:
    """A new, halted disposable of the disposable template ``base``."""
    if not getattr(base, "template_for_dispvms", False):
        raise QubesValueError(f"{base.name!r} is not a disposable template "
                              f"(template_for_dispvms is False)")
    vm = await app.create_vm("DispVM", name=_free_name(app), label=base.label, template=base,
                             tags=("created-by-dom0", "disposable"))
    with app.transaction():
        vm.auto_cleanup = True
    log.info("made disposable %s of %s", vm.name, base.name)
    return vm


async def destroy_disposable(app: Any, vm: Any) -> None:
    """Kill the disposable if it runs, then remove its definition and volumes
    (if its stop did not already, through ``auto_cleanup``)."""
    if not vm.is_halted():
        await vm.kill()
    if app.domains.get(vm.name) is vm:
        try:
            await app.remove_vm(vm)
        except Exception:  # noqa: BLE001 -- removed meanwhile by its auto_cleanup
            if app.domains.get(vm.name) is vm:
                raise
    log.info("destroyed disposable %s", vm.name)


async def clean_up_leftovers(app: Any) -> None:
    """At the daemon's start: the disposables a previous daemon left (it was killed
    while they ran, or before their removal) go, with every volume.  Whoever they
    were made for is gone, and nothing of a disposable may outlive its use."""
    for vm in [vm for vm in app.iter_qubes() if type(vm).__name__ == "DispVM"
               and getattr(vm, "auto_cleanup", False)]:
        log.info("removing disposable %s, left by a previous run", vm.name)
        try:
            await destroy_disposable(app, vm)
        except Exception:  # noqa: BLE001 -- one must not keep the daemon down
            log.exception("cannot remove the leftover disposable %s", vm.name)
