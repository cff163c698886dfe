"""admin.vm.firewall.{Get, Set, Reload}: a qube's firewall rules, Qubes' line format.

``Get`` answers the rules in force, one a line (expired ones left out);
``Set`` replaces them all with the payload's lines, each checked
(:mod:`bulkhead.guest.fwrules`), and returns once the qube's netvm applied
them (or after :data:`APPLY_WAIT` seconds, the push going on); ``Reload``
pushes them again.  The rules of a qube that has no running netvm are stored
and applied when it gets one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .. import firewall
from ..errors import QubesException, QubesValueError
from .registry import Call, method

#: seconds Set and Reload wait for the netvm to apply the rules before answering
APPLY_WAIT = 10.0
MAX_SET_PAYLOAD = firewall.fwrules.MAX_RULES * (firewall.fwrules.MAX_LINE + 1)


def _home(call: Call) -> Path:
    paths = getattr(call.app, "paths", None)
    if paths is None:
        raise QubesException("this daemon keeps no firewall rules (no home directory)")
    return paths.home


async def _apply(call: Call) -> None:
    network = getattr(call.app.lifecycle, "network", None)
    if network is None:
        return
    pushed = network.firewall_changed(call.dest)
    if pushed is not None:
        try:
            await asyncio.wait_for(asyncio.shield(pushed), APPLY_WAIT)
        except asyncio.TimeoutError:
            pass   # it goes on; the daemon's log will say if it fails


@method("admin.vm.firewall.Get", dest="vm", arg=False, payload=False)
async def firewall_get(call: Call) -> str:
    try:
        rules = firewall.load(_home(call), call.dest.name)
    except firewall.RuleError as e:
        raise QubesValueError(f"the stored firewall rules of {call.dest.name!r} are "
                              f"unusable (the qube is blocked): {e}") from None
    return firewall.format_rules(firewall.active(rules, time.time()))


@method("admin.vm.firewall.Set", dest="vm", arg=False, payload=None,
        max_payload=MAX_SET_PAYLOAD)
async def firewall_set(call: Call) -> None:
    try:
        untrusted_text = call.untrusted_payload.decode("ascii", "strict")
    except UnicodeDecodeError:
        raise QubesValueError("firewall rules must be ASCII text") from None
    rules = firewall.parse_set_payload(untrusted_text)
    firewall.save(_home(call), call.dest.name, rules)
    call.dest.fire_event("firewall-changed")
    await _apply(call)


@method("admin.vm.firewall.Reload", dest="vm", arg=False, payload=False)
async def firewall_reload(call: Call) -> None:
    await _apply(call)
