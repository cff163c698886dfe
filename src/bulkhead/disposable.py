"""Disposable qubes made on demand, destroyed with all their data when done.

A disposable is a :class:`~bulkhead.vm.dispvm.DispVM` of a disposable template
(an AppVM with ``template_for_dispvms``): its root and private are snapshots of
the template's, its volatile fresh (:func:`bulkhead.vm.volumes.dispvm_layout`),
so nothing it does outlives it.  It is named ``dispNNNN`` after its ``dispid``, a
number from 1 to 9999 no other disposable has, chosen at random as in Qubes, and
carries ``auto_cleanup``: when it halts, its definition and every volume go.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from .errors import QubesException, QubesValueError

log = logging.getLogger(__name__)

MAX_DISPID = 9999


def _free_dispid(app: Any) -> int:
    """A number no disposable uses, chosen at random as Qubes does (a name that says
    nothing of how many disposables came before)."""
    taken = {getattr(vm, "dispid", 0) for vm in app.iter_qubes()}
    creating = getattr(app, "_creating", {})
    free = [n for n in range(1, MAX_DISPID + 1) if n not in taken
            and app.domains.get(f"disp{n}") is None and f"disp{n}" not in creating]
    if not free:
        raise QubesException(f"no free disposable number: {MAX_DISPID} disposables exist")
    return random.SystemRandom().choice(free)


async def get_disposable(app: Any, base: Any) -> Any:
    """A disposable of ``base`` for a caller: a preloaded one, running, if there is
    one ready (see :class:`Preloader`), else a new one, halted."""
    preloader = getattr(app, "preloader", None)
    vm = preloader.take(base) if preloader is not None else None
    if vm is None:
        return await create_disposable(app, base)
    await vm.unpause()
    return vm


async def create_disposable(app: Any, base: Any) -> Any:
    """A new, halted disposable of the disposable template ``base``."""
    if not getattr(base, "template_for_dispvms", False):
        raise QubesValueError(f"{base.name!r} is not a disposable template "
                              f"(template_for_dispvms is False)")
    dispid = _free_dispid(app)
    vm = await app.create_vm("DispVM", name=f"disp{dispid}", label=base.label, template=base,
                             tags=("created-by-dom0", "disposable"))
    with app.transaction():
        vm.dispid = dispid
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


# --- preloaded disposables (Qubes 4.3) ------------------------------------------------------
#
# The feature ``preload-dispvm-max`` of a disposable template asks for that many
# disposables kept started and paused; its feature ``preload-dispvm`` lists them
# (space-separated, oldest first), and each carries ``preload-dispvm-completed``
# once it is ready.  A request takes the oldest ready one -- taken off the list
# before anything awaits, so it is never handed out twice -- unpauses it, and a
# refill starts in the background.  When the template's volumes change (it
# stopped: its commit is the new source), the preloads were snapshots of the old
# ones: they are destroyed and made again.

MAX_FEATURE = "preload-dispvm-max"
LIST_FEATURE = "preload-dispvm"
DONE_FEATURE = "preload-dispvm-completed"
#: seconds between handing out a preload and starting its replacement
REFILL_DELAY = 3.0


def _preloads(base: Any) -> list[str]:
    return (base.features.get(LIST_FEATURE, "") or "").split()


def _wanted(base: Any) -> int:
    try:
        return max(0, min(int(base.features.get(MAX_FEATURE, "0") or "0"), 16))
    except ValueError:
        return 0


class Preloader:
    """Keeps each disposable template's preloads (one per daemon)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._filling: dict[str, asyncio.Task[None]] = {}
        app.add_observer(self._observe)

    def _set_list(self, base: Any, names: list[str]) -> None:
        with self.app.transaction():
            if names:
                base.features[LIST_FEATURE] = " ".join(names)
            elif LIST_FEATURE in base.features:
                del base.features[LIST_FEATURE]

    def take(self, base: Any) -> Any | None:
        """A ready preload of ``base``, off the list (the caller unpauses it), or None."""
        for name in _preloads(base):
            vm = self.app.domains.get(name)
            if vm is not None and vm.features.get(DONE_FEATURE, "") and vm.is_paused():
                self._set_list(base, [n for n in _preloads(base) if n != name])
                with self.app.transaction():
                    del vm.features[DONE_FEATURE]
                # The refill boots a qube: under TCG that takes the CPU the caller's
                # command needs now, so it waits a moment.
                self.schedule(base, delay=REFILL_DELAY)
                return vm
        return None

    def schedule(self, base: Any, delay: float = 0.0) -> None:
        task = self._filling.get(base.name)
        if task is None or task.done():
            self._filling[base.name] = asyncio.ensure_future(self._fill(base, delay))

    async def _fill(self, base: Any, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            while self.app.domains.get(base.name) is base:
                names = [n for n in _preloads(base) if self.app.domains.get(n) is not None]
                if len(names) > _wanted(base):
                    extra = self.app.domains[names.pop()]
                    self._set_list(base, names)
                    await destroy_disposable(self.app, extra)
                    continue
                if len(names) == _wanted(base) or not base.is_halted():
                    self._set_list(base, names)
                    return  # full; or the template runs: its volumes are about to change
                vm = await create_disposable(self.app, base)
                self._set_list(base, names + [vm.name])
                try:
                    await vm.start()
                    await vm.pause()
                except Exception:  # noqa: BLE001 -- logged; a later refill tries again
                    log.exception("preloading a disposable of %s failed", base.name)
                    self._set_list(base, [n for n in _preloads(base) if n != vm.name])
                    await destroy_disposable(self.app, vm)
                    return
                with self.app.transaction():
                    vm.features[DONE_FEATURE] = "1"
                log.info("preloaded disposable %s of %s", vm.name, base.name)
        except Exception:  # noqa: BLE001 -- the daemon goes on; the next event retries
            log.exception("keeping the preloaded disposables of %s failed", base.name)

    async def refresh(self, base: Any) -> None:
        """The template's volumes changed: its preloads are stale."""
        stale = _preloads(base)
        self._set_list(base, [])
        for name in stale:
            vm = self.app.domains.get(name)
            if vm is not None:
                await destroy_disposable(self.app, vm)
        self.schedule(base)

    def _observe(self, subject: Any, event: str, kwargs: dict[str, Any]) -> None:
        if not getattr(subject, "template_for_dispvms", False):
            return
        if event in (f"domain-feature-set:{MAX_FEATURE}", f"domain-feature-delete:{MAX_FEATURE}"):
            self.schedule(subject)
        elif event == "domain-shutdown" and _preloads(subject):
            asyncio.ensure_future(self.refresh(subject))

    def start(self) -> None:
        """At the daemon's start: fill every template that asks for preloads."""
        for vm in list(self.app.iter_qubes()):
            if getattr(vm, "template_for_dispvms", False) and (_wanted(vm) or _preloads(vm)):
                self._set_list(vm, [])   # the old ones went with clean_up_leftovers
                self.schedule(vm)
