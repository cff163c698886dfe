"""The policy's command-line tools.

``qrexec-policy-lint [FILE|DIR...]`` checks policy files (default: the
instance's whole ``policy.d``) and names every bad line; it exits 1 if any.

``bulkhead policy why SERVICE[+ARG] SOURCE TARGET`` prints the decision for a
call and the line that made it.  It reads the policy directory itself (as
Qubes' own policy tools read ``/etc/qubes/policy.d``: what it shows is what
the files say now, which is what the daemon uses, since the daemon re-reads
changed files before each decision) and asks the daemon for the qubes'
classes, tags and disposable settings through the Admin API.

``bulkhead policy log [-n N]`` prints the end of the audit log.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path
from typing import Any

from ..config import Paths
from ..errors import QubesException
from .policy import PolicyEngine, audit_log_of, lint, policy_dir_of
from .policy_eval import Decision, QubeInfo


def lint_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qrexec-policy-lint",
                                description="Check qrexec policy files and name the bad lines.")
    p.add_argument("paths", nargs="*", type=Path, metavar="FILE",
                   help="policy files or directories (default: the whole policy directory)")
    p.add_argument("--policy-dir", type=Path,
                   help="where !include paths resolve (default: each file's directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the errors")
    args = p.parse_args(argv)
    paths = args.paths or [policy_dir_of(Paths.from_env().home)]
    messages = lint(paths, args.policy_dir)
    for message in messages:
        print(message, file=sys.stderr)
    if messages:
        print(f"qrexec-policy-lint: {len(messages)} error(s); while the policy has errors "
              f"every qrexec call is denied", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{', '.join(map(str, paths))}: OK")
    return 0


# --- why -----------------------------------------------------------------------------------

def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\\\", "\\")


def system_info_from_client(app: Any) -> dict[str, QubeInfo]:
    """What the policy needs about every qube, from the daemon (client ``App``)."""
    states: dict[str, tuple[str, str]] = {}
    for line in app.call("dom0", "admin.vm.List").decode().splitlines():
        name, *fields = line.split(" ")
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        states[name] = (values.get("class", ""), values.get("state", ""))
    props: dict[str, dict[str, str]] = {name: {} for name in states}
    reply = app.call("dom0", "bulkhead.vm.property.GetAllOfAll").decode()
    for line in reply.splitlines():
        qube, _, rest = line.partition(" ")
        prop, _, rest = rest.partition(" ")
        _, _, rest = rest.partition(" ")     # default=...
        _, _, value = rest.partition(" ")    # type=..., then the value
        props.setdefault(qube, {})[prop] = _unescape(value)
    system = {}
    for name, (klass, state) in states.items():
        mine = props.get(name, {})
        tags = app.call(name, "admin.vm.tag.List").decode().split()
        system[name] = QubeInfo(
            name=name, klass=klass or mine.get("klass", ""), tags=frozenset(tags),
            default_dispvm=mine.get("default_dispvm") or None,
            template_for_dispvms=mine.get("template_for_dispvms") == "True",
            running=state in ("Running", "Transient", "Halting"),
            dispvm_template=(mine.get("template") or None) if klass == "DispVM" else None,
            label=mine.get("label") or None, icon=mine.get("icon") or None)
    return system


def describe(decision: Decision, service: str, argument: str, source: str, target: str) -> str:
    call = f"{service}+{argument} from {source} to {target or '@default'}"
    lines = [f"{decision.action}: {call}"]
    if decision.action == "allow":
        lines.append(f"  runs in: {decision.target}"
                     + (f" as {decision.user}" if decision.user else "")
                     + ("" if decision.autostart else " (only if already running)"))
    elif decision.action == "ask":
        lines.append(f"  choices: {', '.join(decision.ask_targets)}")
        if decision.default_target:
            lines.append(f"  default: {decision.default_target}")
    lines.append(f"  because: {decision.reason}")
    lines.append(f"  decided by: {decision.origin}")
    if decision.line:
        lines.append(f"    {decision.line}")
    return "\n".join(lines)


def why(paths: Paths, rpc: str, source: str, target: str, policy_dir: Path | None,
        system: dict[str, QubeInfo] | None = None) -> tuple[Decision, str]:
    service, _, argument = rpc.partition("+")
    if target in ("''", '""', "@default"):
        target = ""
    if system is None:
        from ..client.app import App
        from ..client.connection import Connection

        system = system_info_from_client(App(Connection(str(paths.socket))))
    engine = PolicyEngine(policy_dir or policy_dir_of(paths.home))
    decision = engine.evaluate(service, argument, source, target, system)
    return decision, describe(decision, service, argument, source, target)


# --- log -----------------------------------------------------------------------------------

def tail(path: Path, count: int) -> list[str]:
    with path.open("rb") as f:
        last = deque(f, maxlen=count)
    return [line.decode("utf-8", "backslashreplace").rstrip("\n") for line in last]


def main(argv: list[str] | None = None) -> int:
    """``bulkhead policy ...``"""
    p = argparse.ArgumentParser(prog="bulkhead policy", description="The qrexec policy.")
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("why", help="the decision for a call, and the line that made it")
    w.add_argument("rpc", metavar="SERVICE[+ARG]")
    w.add_argument("source", metavar="SOURCE")
    w.add_argument("target", metavar="TARGET", help="a qube, dom0, @dispvm[:NAME] or @default")
    w.add_argument("--policy-dir", type=Path, help="default: $BULKHEAD_HOME/policy.d")
    log = sub.add_parser("log", help="the end of the audit log of qrexec calls")
    log.add_argument("-n", "--lines", type=int, default=50, help="how many lines (50)")
    sub.add_parser("lint", help="check the policy directory (as qrexec-policy-lint)")
    args = p.parse_args(argv)
    paths = Paths.from_env()
    if args.what == "lint":
        return lint_main([])
    if args.what == "log":
        path = audit_log_of(paths.home)
        if not path.exists():
            print(f"{path}: no qrexec call logged yet")
            return 0
        for line in tail(path, max(args.lines, 1)):
            print(line)
        return 0
    try:
        decision, text = why(paths, args.rpc, args.source, args.target, args.policy_dir)
    except (OSError, QubesException) as e:
        print(f"bulkhead policy why: cannot ask the daemon about the qubes: {e}",
              file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
