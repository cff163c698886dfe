"""Each qube's firewall rules, Qubes' model: what ``admin.vm.firewall.*`` and
``qvm-firewall`` manage and the qube's netvm enforces.

A rule list is ordered, the first match wins, and an implicit final rule
drops; a new qube has one rule, ``action=accept``.  The format of a rule (and
its parser, used again inside the firewall qube) is
:mod:`bulkhead.guest.fwrules`.  Rules with an ``expire`` time drop out when it
passes: dom0 leaves them out of what it sends, and reloads the netvm then.

Stored as one file per qube (``$BULKHEAD_HOME/firewall/NAME.rules``), the
canonical lines, written atomically.  A file that cannot be read or parsed is
not "no rules": the qube's netvm is told to block the qube entirely (fail
closed), and the daemon logs why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import QubesValueError
from .guest import fwrules
from .guest.fwrules import RuleError

Rule = dict[str, str]
DEFAULT_RULES: list[Rule] = [{"action": "accept"}]


def rules_path(home: Path, name: str) -> Path:
    return home / "firewall" / f"{name}.rules"


def load(home: Path, name: str) -> list[Rule]:
    """The qube's rules (the default if it never had any); RuleError if unusable."""
    path = rules_path(home, name)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return [dict(r) for r in DEFAULT_RULES]
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"cannot read {path}: {e}") from None
    return fwrules.parse_rules(text)


def save(home: Path, name: str, rules: list[Rule]) -> None:
    path = rules_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(format_rules(rules))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(home: Path, name: str) -> None:
    rules_path(home, name).unlink(missing_ok=True)


def format_rules(rules: list[Rule]) -> str:
    return "".join(fwrules.format_rule(r) + "\n" for r in rules)


def parse_set_payload(untrusted_text: str) -> list[Rule]:
    """``admin.vm.firewall.Set``'s payload: rules one a line; QubesValueError if any is bad."""
    try:
        return fwrules.parse_rules(untrusted_text)
    except RuleError as e:
        raise QubesValueError(f"invalid firewall rule: {e}") from None


def active(rules: list[Rule], now: float) -> list[Rule]:
    """The rules still in force at ``now`` (expired ones drop out)."""
    return [r for r in rules if "expire" not in r or int(r["expire"]) > now]


def next_expiry(rules: list[Rule], now: float) -> int | None:
    """When the next rule expires (unix time), if any does after ``now``."""
    times = [int(r["expire"]) for r in rules if "expire" in r and int(r["expire"]) > now]
    return min(times) if times else None


def describe(rule: Any) -> str:
    return fwrules.format_rule(rule)
