"""The qrexec policy engine: dom0's decision on every call between qubes.

:class:`PolicyEngine` holds the rules of ``$BULKHEAD_HOME/policy.d`` and
answers :meth:`PolicyEngine.evaluate`.  It re-reads the files when they
change (every file and directory it read is stat'ed before each decision;
``admin.policy.Replace``/``Remove`` also call :meth:`PolicyEngine.reload`).
Fail closed: while any file has an error, every call is denied, and the
decision cites the error.

:func:`system_info` builds what the policy needs about the qubes from the
daemon's app; :func:`audit_line` formats one line of the audit log
(``$BULKHEAD_HOME/log/qrexec.log``); :func:`lint` checks files.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .policy_eval import Decision, QubeInfo, SystemInfo, deny, evaluate_rules
from .policy_parse import (FILENAME_RE, POLICY_SUFFIX, LoadedPolicy, PolicyLoader, Rule,
                           load_policy)

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App

AUDIT_LOG_NAME = "qrexec.log"


def policy_dir_of(home: Path) -> Path:
    """Where an instance keeps its policy (``/etc/qubes/policy.d`` links there)."""
    return Path(home) / "policy.d"


def audit_log_of(home: Path) -> Path:
    return Path(home) / "log" / AUDIT_LOG_NAME


class PolicyEngine:
    """The rules of one policy directory, kept current (see the module doc)."""

    def __init__(self, policy_dir: Path) -> None:
        self.policy_dir = Path(policy_dir)
        self._loaded = LoadedPolicy()
        self.reload()

    def reload(self) -> None:
        """Read every file again (after a change through the Admin API, or on demand)."""
        self._loaded = load_policy(self.policy_dir)

    def _changed(self) -> bool:
        """Whether any file or directory read last time changed, appeared or went away.
        A new file in a directory changes the directory's mtime."""
        for path, seen in self._loaded.seen.items():
            try:
                st = os.stat(path)
            except OSError:
                if seen is not None:
                    return True
                continue
            if seen != (st.st_mtime_ns, st.st_size, st.st_ino):
                return True
        return False

    def refresh(self) -> None:
        if self._changed():
            self.reload()

    def errors(self) -> list[str]:
        return list(self._loaded.errors)

    @property
    def rules(self) -> list[Rule]:
        return list(self._loaded.rules)

    def evaluate(self, service: str, argument: str, source: str, target: str,
                 system: SystemInfo) -> Decision:
        """The decision for ``service+argument`` from ``source`` to ``target``.

        ``argument`` comes without its ``+`` (``""`` is the empty argument), as
        ``QREXEC_SERVICE_ARGUMENT`` holds it; ``target`` is what the caller asked
        for (``""`` meaning ``@default``).  ``source`` must be the caller's real
        name, taken from the channel the request came on.
        """
        self.refresh()
        if self._loaded.errors:
            count = len(self._loaded.errors)
            return deny(target, self._loaded.errors[0],
                        f"the policy has {count} error(s): every call is denied until "
                        f"they are fixed")
        return evaluate_rules(self._loaded.rules, service, argument, source, target, system)


# --- the daemon's engine ---------------------------------------------------------------------

#: one engine per app (the daemon has one app; tests have several)
_ENGINES: "weakref.WeakKeyDictionary[Any, PolicyEngine]" = weakref.WeakKeyDictionary()


def attach_engine(app: Any, policy_dir: Path) -> PolicyEngine:
    """Give ``app`` the engine of ``policy_dir`` (tests; instances without paths)."""
    engine = _ENGINES[app] = PolicyEngine(policy_dir)
    return engine


def engine_for(app: Any) -> PolicyEngine:
    """The app's engine: the one attached, else that of ``$BULKHEAD_HOME/policy.d``.
    Raises LookupError for an app with neither (an in-memory test app)."""
    engine = _ENGINES.get(app)
    if engine is None:
        paths = getattr(app, "paths", None)
        if paths is None:
            raise LookupError("this app has no policy directory")
        engine = attach_engine(app, policy_dir_of(paths.home))
    return engine


# --- what the policy knows about the qubes -------------------------------------------------

def qube_info(vm: Any) -> QubeInfo:
    """The policy's view of one of the daemon's qubes."""
    default_dispvm = getattr(vm, "default_dispvm", None)
    template = getattr(vm, "template", None) if type(vm).__name__ == "DispVM" else None
    label = getattr(vm, "label", None)
    return QubeInfo(
        name=vm.name,
        klass=type(vm).__name__,
        tags=frozenset(vm.tags),
        default_dispvm=getattr(default_dispvm, "name", None),
        template_for_dispvms=bool(getattr(vm, "template_for_dispvms", False)),
        running=bool(vm.is_running()),
        dispvm_template=getattr(template, "name", None),
        label=getattr(label, "name", None),
        icon=getattr(vm, "icon", None),
    )


def system_info(app: "App") -> dict[str, QubeInfo]:
    """Every qube of the daemon's app, dom0 included, by name."""
    return {vm.name: qube_info(vm) for vm in app.domains}


# --- the audit log -------------------------------------------------------------------------

def _clean(value: str) -> str:
    """A value a qube may have chosen, made safe for one log line: printable ASCII
    but space, '\\' escaped; everything else as \\xNN."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0x20 < code < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out) or "''"


def audit_line(decision: Decision, service: str, argument: str, source: str, target: str,
               now: float | None = None) -> str:
    """One line (no newline) for the audit log: when, the verdict, the call, and the
    policy line that decided::

        2026-12-03T08:00:00Z deny source=untrusted target=work service=qubes.VMShell
        argument='' resolved=work origin=/var/lib/bulkhead/policy.d/90-default.policy:82
        line="qubes.VMShell * @anyvm @anyvm deny" reason="denied by policy"
    """
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    fields = [stamp, decision.action, f"source={_clean(source)}", f"target={_clean(target)}",
              f"service={_clean(service)}", f"argument={_clean(argument)}",
              f"resolved={_clean(decision.target)}"]
    if decision.action == "ask":
        fields.append(f"choices={_clean(','.join(decision.ask_targets))}")
    if decision.user:
        fields.append(f"user={_clean(decision.user)}")
    fields += [f"origin={_clean(decision.origin)}",
               f"line={json.dumps(decision.line, ensure_ascii=True)}",
               f"reason={json.dumps(decision.reason, ensure_ascii=True)}"]
    return " ".join(fields)


def append_audit(log_path: Path, line: str) -> None:
    """Append one line (O_APPEND: concurrent writers do not interleave a line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, (line + "\n").encode("ascii", "backslashreplace"))
    finally:
        os.close(fd)


# --- lint ----------------------------------------------------------------------------------

def lint(paths: Iterable[Path], policy_dir: Path | None = None) -> list[str]:
    """Every problem in the given files or directories, as ``FILE:LINE: what``.

    A directory is checked as a policy directory; a file on its own, with its
    includes resolved against ``policy_dir`` (default: the file's directory,
    which is the policy directory for the files that live there).
    """
    messages: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            messages += load_policy(path).errors
            continue
        if path.name.endswith(POLICY_SUFFIX) and (path.name.startswith(".")
                                                  or not FILENAME_RE.match(path.name)):
            messages.append(f"{path}: invalid policy file name: only 0-9, a-z, '_', '.' and "
                            f"'-' are allowed (in a policy directory it makes every call deny)")
        base = policy_dir if policy_dir is not None else Path(os.path.abspath(path)).parent
        messages += PolicyLoader(base).load_files([path]).errors
    return messages
