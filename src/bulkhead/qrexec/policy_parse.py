"""Reading qrexec policy files (Qubes 4.1+ format) into rules, strictly.

A policy directory holds ``*.policy`` files, read in C-locale (byte) order.
Each non-empty, non-comment line is either a rule::

    SERVICE|*  +ARGUMENT|+|*  SOURCE  TARGET  allow|deny|ask  [PARAM=VALUE ...]

or a directive: ``!include FILE``, ``!include-dir DIR``,
``!include-service SERVICE|* +ARG|* FILE`` (FILE in the old per-service
format: ``SOURCE TARGET ACTION[,PARAM=VALUE...]``, ``$`` for ``@``).
Relative paths resolve against the policy directory, as Qubes does.

Nothing malformed is skipped: every error is collected as
``FILE:LINE: what is wrong`` and the loader carries on, so that lint can
name every bad line at once; whoever evaluates a policy with errors must
deny every call (see :class:`bulkhead.qrexec.policy.PolicyEngine`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .policy_tokens import Context, Kind, Token, TokenError, parse_token

POLICY_SUFFIX = ".policy"
#: a policy file's name, as Qubes requires it (C-locale order is then unambiguous)
FILENAME_RE = re.compile(r"\A[0-9a-z_.-]+\Z")
#: a service name: Qubes' RPC name characters, without '+'
SERVICE_RE = re.compile(r"\A[a-zA-Z0-9._-]{1,64}\Z")
#: an argument as a policy line writes it: '+' then Qubes' RPC name characters
ARGUMENT_RE = re.compile(r"\A\+[a-zA-Z0-9._+-]{0,64}\Z")
#: user=: a Unix user name in the target qube (no shell or path characters)
USER_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_.-]{0,31}\Z")
#: a loop of !include must end somewhere even without the cycle guard
MAX_INCLUDE_DEPTH = 16

ACTIONS = ("allow", "deny", "ask")
#: the parameters each action takes (Qubes' Allow, Deny, Ask)
_PARAMS: dict[str, frozenset[str]] = {
    "allow": frozenset({"target", "user", "notify", "autostart"}),
    "deny": frozenset({"notify"}),
    "ask": frozenset({"target", "default_target", "user", "notify", "autostart"}),
}


#: builds the error for the line being parsed
_Fail = Callable[[str], "PolicySyntaxError"]


class PolicySyntaxError(ValueError):
    """One thing wrong in a policy file; ``str()`` is ``FILE:LINE: message``."""

    def __init__(self, path: Path | str, lineno: int | None, message: str) -> None:
        self.path, self.lineno, self.message = str(path), lineno, message
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Rule:
    """One policy line, checked.  ``service``/``argument`` None mean ``*``;
    ``argument`` keeps its ``+`` (``"+"`` is the empty argument)."""

    service: str | None
    argument: str | None
    source: Token
    target: Token
    action: str
    redirect: Token | None = None          # target=
    default_target: Token | None = None    # default_target= (ask only)
    user: str | None = None
    notify: bool = False
    autostart: bool = True
    path: str = "<string>"
    lineno: int = 0
    text: str = ""

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.lineno}"


def parse_rule(service: str, argument: str, source: str, target: str, action: str,
               params: list[str], *, path: Path | str, lineno: int, text: str) -> Rule:
    """A rule from its fields (PolicySyntaxError naming ``path:lineno`` otherwise)."""

    def fail(message: str) -> PolicySyntaxError:
        return PolicySyntaxError(path, lineno, message)

    svc = None if service == "*" else service
    arg = None if argument == "*" else argument
    if svc is not None and not SERVICE_RE.match(svc):
        raise fail(f"invalid service name {service!r} (letters, digits, '.', '_', '-'; or *)")
    if arg is not None:
        if not arg.startswith("+"):
            raise fail(f"argument {argument!r} must start with '+' (or be * for any)")
        if not ARGUMENT_RE.match(arg):
            raise fail(f"invalid argument {argument!r}")
        if svc is None:
            raise fail("a * service takes only a * argument")
    try:
        src = parse_token(source, Context.SOURCE)
        dst = parse_token(target, Context.TARGET)
    except TokenError as e:
        raise fail(str(e)) from None
    if action not in ACTIONS:
        raise fail(f"invalid action {action!r} (allow, deny or ask)")
    values = _params(params, action, fail)
    try:
        redirect = _redirect(values.get("target"))
        default_target = _redirect(values.get("default_target"))
    except TokenError as e:
        raise fail(str(e)) from None
    user = values.get("user")
    if user is not None and not USER_RE.match(user):
        raise fail(f"invalid user {user!r}")
    # Qubes: with @default as the target, allow has nowhere to go without target=
    if dst.kind is Kind.DEFAULT and action == "allow" and redirect is None:
        raise fail("allow for a @default target needs target=")
    return Rule(svc, arg, src, dst, action, redirect, default_target, user,
                notify=_bool(values, "notify", action == "deny", fail),
                autostart=_bool(values, "autostart", True, fail),
                path=str(path), lineno=lineno, text=text)


def _params(params: list[str], action: str, fail: _Fail) -> dict[str, str]:
    values: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or not key:
            raise fail(f"invalid parameter {param!r} (expected NAME=VALUE)")
        if key not in _PARAMS[action]:
            allowed = ", ".join(sorted(_PARAMS[action]))
            raise fail(f"{action} does not take {key}= (it takes {allowed})")
        if key in values:
            raise fail(f"parameter {key}= given twice")
        if not value:
            raise fail(f"parameter {key}= has no value")
        values[key] = value
    return values


def _redirect(text: str | None) -> Token | None:
    return None if text is None else parse_token(text, Context.REDIRECT)


def _bool(values: dict[str, str], key: str, default: bool, fail: _Fail) -> bool:
    value = values.get(key)
    if value is None:
        return default
    if value not in ("yes", "no"):
        raise fail(f"{key}={value!r}: it can only be yes or no")
    return value == "yes"


@dataclass
class LoadedPolicy:
    """What a directory holds: its rules in order, every error, and what was read
    (path -> (mtime_ns, size, inode), None if absent) to notice later changes."""

    rules: list[Rule] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seen: dict[str, tuple[int, int, int] | None] = field(default_factory=dict)


class PolicyLoader:
    """Loads a policy directory.  ``overrides`` maps a path to the content it should
    be taken to have (None: absent), to validate a change before making it."""

    def __init__(self, policy_dir: Path,
                 overrides: Mapping[Path, str | None] | None = None) -> None:
        self.policy_dir = Path(os.path.abspath(policy_dir))
        self.overrides = {Path(os.path.abspath(p)): c for p, c in (overrides or {}).items()}
        self.result = LoadedPolicy()
        self._stack: list[Path] = []

    # --- entry points -----------------------------------------------------------------
    def load(self) -> LoadedPolicy:
        self._load_dir(self.policy_dir, None, 0)
        return self.result

    def load_files(self, paths: list[Path]) -> LoadedPolicy:
        """Only these files (lint of named files), includes resolved as usual."""
        for path in paths:
            self._load_file(Path(os.path.abspath(path)), None, 0)
        return self.result

    # --- plumbing ---------------------------------------------------------------------
    def _error(self, error: PolicySyntaxError | str) -> None:
        self.result.errors.append(str(error))

    def _note(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            self.result.seen[str(path)] = None
        else:
            self.result.seen[str(path)] = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _resolve(self, name: str) -> Path:
        # Qubes resolves every include against the policy directory
        return Path(os.path.normpath(self.policy_dir / name))

    def _list_dir(self, directory: Path) -> list[Path] | str:
        """The policy files of ``directory`` in C-locale order, or an error message."""
        self._note(directory)
        try:
            names = {entry.name for entry in os.scandir(directory)
                     if entry.is_file() and entry.name.endswith(POLICY_SUFFIX)}
        except OSError as e:
            return f"cannot read the directory: {e.strerror or e}"
        for path, content in self.overrides.items():
            if path.parent == directory and path.name.endswith(POLICY_SUFFIX):
                (names.add if content is not None else names.discard)(path.name)
        # editors' backups and swap files start with a dot; Qubes ignores them
        names = {n for n in names if not n.startswith(".")}
        bad = sorted(n for n in names if not FILENAME_RE.match(n))
        if bad:
            return (f"invalid policy file name(s) {', '.join(map(repr, bad))}: only 0-9, a-z, "
                    f"'_', '.' and '-' are allowed")
        return [directory / n for n in sorted(names, key=lambda n: n.encode())]

    def _read(self, path: Path) -> list[str] | tuple[int | None, str]:
        """The file's lines, or (line number or None, what is wrong)."""
        if path in self.overrides:
            content = self.overrides[path]
            if content is None:
                return None, "no such file"
            data = content.encode("utf-8", "surrogateescape")
        else:
            self._note(path)
            try:
                data = path.read_bytes()
            except IsADirectoryError:
                return None, "not a file"
            except OSError as e:
                return None, e.strerror or str(e)
        lines = []
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return lineno, "not valid UTF-8"
        return lines

    def _enter(self, path: Path, at: tuple[Path, int] | None, depth: int) -> bool:
        """Whether ``path`` may be loaded now (the cycle and depth guards)."""
        where = (at[0], at[1]) if at else (path, None)
        if path in self._stack:
            chain = " -> ".join(str(p) for p in [*self._stack, path])
            self._error(PolicySyntaxError(*where, f"include cycle: {chain}"))
            return False
        if depth > MAX_INCLUDE_DEPTH:
            self._error(PolicySyntaxError(*where, f"includes nested deeper than "
                                                  f"{MAX_INCLUDE_DEPTH}"))
            return False
        return True

    def _load_dir(self, directory: Path, at: tuple[Path, int] | None, depth: int) -> None:
        listing = self._list_dir(directory)
        if isinstance(listing, str):
            self._error(PolicySyntaxError(*(at or (directory, None)),
                                          f"{directory}: {listing}" if at else listing))
            return
        for path in listing:
            self._load_file(path, at, depth)

    def _lines(self, path: Path, at: tuple[Path, int] | None) -> list[str] | None:
        lines = self._read(path)
        if isinstance(lines, tuple):
            lineno, message = lines
            # the file's own error first: that is the line to fix
            self._error(PolicySyntaxError(path, lineno, message))
            if at is not None:
                self._error(PolicySyntaxError(*at, f"cannot include {path}"))
            return None
        return lines

    def _each_line(self, path: Path, at: tuple[Path, int] | None, depth: int,
                   handle: Callable[[int, str], None]) -> None:
        """Read ``path`` (once on the include stack) and hand each rule line to ``handle``;
        a line's error is recorded and the next line is read."""
        if not self._enter(path, at, depth):
            return
        lines = self._lines(path, at)
        if lines is None:
            return
        self._stack.append(path)
        try:
            for lineno, raw in enumerate(lines, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    handle(lineno, line)
                except PolicySyntaxError as e:
                    self._error(e)
        finally:
            self._stack.pop()

    def _load_file(self, path: Path, at: tuple[Path, int] | None, depth: int) -> None:
        self._each_line(path, at, depth,
                        lambda lineno, line: self._line(path, lineno, line, depth))

    def _line(self, path: Path, lineno: int, line: str, depth: int) -> None:
        fields = line.split()
        if line.startswith("!"):
            self._directive(path, lineno, fields, depth)
            return
        if len(fields) < 5:
            raise PolicySyntaxError(path, lineno, f"wrong number of fields ({len(fields)}; "
                                                  f"SERVICE ARGUMENT SOURCE TARGET ACTION "
                                                  f"[PARAM=VALUE...])")
        service, argument, source, target, action, *params = fields
        self.result.rules.append(parse_rule(service, argument, source, target, action, params,
                                            path=path, lineno=lineno, text=line))

    def _directive(self, path: Path, lineno: int, fields: list[str], depth: int) -> None:
        directive, *args = fields
        at = (path, lineno)
        expected = {"!include": 1, "!include-dir": 1, "!include-service": 3}.get(directive)
        if expected is None:
            raise PolicySyntaxError(path, lineno, f"unknown directive {directive!r} "
                                                  f"(!include, !include-dir, !include-service)")
        if len(args) != expected:
            raise PolicySyntaxError(path, lineno, f"{directive} takes {expected} "
                                                  f"parameter(s), not {len(args)}")
        if directive == "!include":
            self._load_file(self._resolve(args[0]), at, depth + 1)
        elif directive == "!include-dir":
            target = self._resolve(args[0])
            if not target.is_dir():
                raise PolicySyntaxError(path, lineno, f"not a directory: {target}")
            if target in self._stack or target == self.policy_dir:
                raise PolicySyntaxError(path, lineno, f"include cycle: {target} is being read")
            self._stack.append(target)
            try:
                self._load_dir(target, at, depth + 1)
            finally:
                self._stack.pop()
        else:
            service, argument, name = args
            # checked like a rule's first two fields
            parse_rule(service, argument, "@anyvm", "@anyvm", "deny", [],
                       path=path, lineno=lineno, text="")
            self._load_service_file(service, argument, self._resolve(name), at, depth + 1)

    def _load_service_file(self, service: str, argument: str, path: Path,
                           at: tuple[Path, int], depth: int) -> None:
        """A file in the old per-service format, for one service and argument."""
        self._each_line(path, at, depth, lambda lineno, line: self._service_line(
            service, argument, path, lineno, line, depth))

    def _service_line(self, service: str, argument: str, path: Path, lineno: int, line: str,
                      depth: int) -> None:
        # the old format's spellings, as Qubes still accepts them
        line = line.replace("$include:", "!include ").replace("$", "@")
        fields = line.replace(",", " ").split()
        if fields[0] == "!include":
            if len(fields) != 2:
                raise PolicySyntaxError(path, lineno, "!include takes 1 parameter")
            self._load_service_file(service, argument, self._resolve(fields[1]),
                                    (path, lineno), depth + 1)
            return
        if fields[0].startswith("!"):
            raise PolicySyntaxError(path, lineno, f"only !include is allowed in a "
                                                  f"per-service file, not {fields[0]!r}")
        if len(fields) < 3:
            raise PolicySyntaxError(path, lineno, "wrong number of fields (SOURCE "
                                                  "TARGET ACTION[,PARAM=VALUE...])")
        source, target, action, *params = fields
        self.result.rules.append(parse_rule(
            service, argument, source, target, action, params,
            path=path, lineno=lineno, text=f"{service} {argument} {line}"))


def load_policy(policy_dir: Path,
                overrides: Mapping[Path, str | None] | None = None) -> LoadedPolicy:
    """Every rule and every error of a policy directory."""
    if not Path(policy_dir).is_dir():
        result = LoadedPolicy()
        result.errors.append(f"{policy_dir}: the policy directory does not exist")
        result.seen[str(os.path.abspath(policy_dir))] = None
        return result
    return PolicyLoader(policy_dir, overrides).load()


def parse_text(text: str, path: str = "<string>") -> list[Rule]:
    """The rules of one policy text without directives (tests, quick checks);
    raises the first PolicySyntaxError."""
    rules = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise PolicySyntaxError(path, lineno, "directives need a policy directory")
        fields = line.split()
        if len(fields) < 5:
            raise PolicySyntaxError(path, lineno, "wrong number of fields")
        service, argument, source, target, action, *params = fields
        rules.append(parse_rule(service, argument, source, target, action, params,
                                path=path, lineno=lineno, text=line))
    return rules
