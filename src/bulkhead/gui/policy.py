"""``qubes.ClipboardPaste``: may the global clipboard, copied from one qube, go to another?

Decided by the qrexec policy (Qubes' service name; Qubes' default line is
``qubes.ClipboardPaste * @anyvm @anyvm ask``).  The user's Ctrl+Shift+V *is*
the answer to ``ask`` (as in Qubes); ``allow`` pastes; ``deny``, or a policy
that cannot be read or evaluated, refuses (fail closed).  Where no policy
directory exists at all (a Bulkhead without qrexec) pasting is allowed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("bulkhead.guid")
SERVICE = "qubes.ClipboardPaste"


def paste_policy(app: Any) -> Callable[[str, str], bool]:
    from ..config import Paths  # noqa: PLC0415
    from ..qrexec.policy import PolicyEngine, policy_dir_of  # noqa: PLC0415
    from ..qrexec.policy_cli import system_info_from_client  # noqa: PLC0415

    policy_dir = policy_dir_of(Paths.from_env().home)

    def allowed(source: str, target: str) -> bool:
        if not policy_dir.exists():
            return True
        try:
            engine = PolicyEngine(policy_dir)
            decision = engine.evaluate(SERVICE, "", source, target, system_info_from_client(app))
        except Exception as e:  # noqa: BLE001 -- any failure refuses the paste
            log.error("%s from %s to %s: the policy could not be evaluated (%s); refused",
                      SERVICE, source, target, e)
            return False
        return decision.action in ("allow", "ask")

    return allowed
