"""Bulkhead's own Admin API method for saved boot states (dom0 only; see
:mod:`bulkhead.bootstate`):

- ``bulkhead.vm.BootState``: one line on the qube's saved boot state, ``ready KEY``,
  ``building KEY``, ``missing KEY`` or ``off`` (the qube boots cold: feature
  ``boot-state`` is 0, or its kind of qube cannot be restored); payload ``build``
  builds a missing state first and waits for it.
"""

from __future__ import annotations

from ..errors import QubesValueError
from .registry import Call, method


@method("bulkhead.vm.BootState", dest="vm", arg=False, payload=None)
async def boot_state(call: Call) -> str:
    untrusted_payload = call.untrusted_payload.strip()
    if untrusted_payload not in (b"", b"build"):
        raise QubesValueError("bulkhead.vm.BootState takes no payload or 'build'")
    build = untrusted_payload == b"build"
    lifecycle = call.app.lifecycle
    report = getattr(lifecycle, "boot_state", None)
    if report is None:
        return "off\n"
    return (await report(call.dest, build=build)) + "\n"
