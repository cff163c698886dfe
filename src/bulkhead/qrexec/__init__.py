"""qrexec: services between qubes under dom0's policy.

This package holds the policy (Qubes 4.1+ format): parsing
(:mod:`.policy_parse`, :mod:`.policy_tokens`), deciding (:mod:`.policy_eval`),
the engine the daemon asks (:mod:`.policy`), changing files through the Admin
API (:mod:`.policy_write`), the shipped defaults (:mod:`.policy_default`) and
the command-line tools (:mod:`.policy_cli`).
"""

from __future__ import annotations

from .policy import (PolicyEngine, append_audit, attach_engine, audit_line, audit_log_of,
                     engine_for, lint, policy_dir_of, qube_info, system_info)
from .policy_eval import Decision, QubeInfo, SystemInfo
from .policy_parse import PolicySyntaxError, Rule

__all__ = ["Decision", "PolicyEngine", "PolicySyntaxError", "QubeInfo", "Rule", "SystemInfo",
           "append_audit", "attach_engine", "audit_line", "audit_log_of", "engine_for", "lint",
           "policy_dir_of", "qube_info", "system_info"]
