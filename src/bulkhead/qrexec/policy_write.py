"""Changing policy files as Qubes' policy admin does: by name, checked, atomically.

The operations behind ``admin.policy.{List,Get,Replace,Remove}`` and
``admin.policy.include.*`` (Qubes' ``policy.*`` services, same formats):

- List: one name per line, without ``.policy``, sorted;
- Get: ``sha256:HEX\\n`` (the token of the current content), then the content;
- Replace: the payload is ``TOKEN\\n`` then the new content; Remove: ``TOKEN``.
  TOKEN is ``any`` (no check), ``new`` (the file must not exist yet) or the
  ``sha256:`` token a Get returned (the file must still be what was read:
  two editors cannot overwrite each other unknowingly).

A change is checked before it is made: the whole policy, with the change,
must load without a new error (a syntax error, a file still included by
another...), so a change through the API never breaks a working policy.
The write is atomic: a temporary file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

from .policy_parse import POLICY_SUFFIX, load_policy

#: a file name as the API accepts it: what the loader accepts (lowercase: an
#: upper-case name would make every call deny), no leading dot
NAME_RE = re.compile(r"\A[0-9a-z_-][0-9a-z_.-]{0,99}\Z")
#: the biggest content Replace accepts
MAX_CONTENT = 1024 * 1024


class PolicyWriteError(ValueError):
    """The request cannot be done; the message says why."""


class PolicyTokenError(PolicyWriteError):
    """The file is not in the state the token says (changed since it was read)."""


def token_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def validate_name(untrusted_name: str) -> str:
    if not NAME_RE.match(untrusted_name):
        raise PolicyWriteError(f"invalid policy name {untrusted_name[:64]!r}: 0-9, a-z, '_', "
                               f"'.' and '-' only, not starting with '.', at most 100")
    return untrusted_name


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    The temporary file starts with a dot: the loader ignores such files, so
    one left behind by a crash can never be read as policy (nor break it)."""
    temp = path.with_name(f".{path.name}.new")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PolicyFiles:
    """The policy files of one directory (``include=True``: its ``include/``)."""

    def __init__(self, policy_dir: Path, include: bool = False) -> None:
        self.policy_dir = Path(policy_dir)
        self.include = include
        self.directory = self.policy_dir / "include" if include else self.policy_dir
        self.suffix = "" if include else POLICY_SUFFIX

    def path(self, untrusted_name: str) -> Path:
        return self.directory / (validate_name(untrusted_name) + self.suffix)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time (an admin tool outside the daemon takes the same lock)."""
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.policy_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def list(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        names = []
        for entry in os.scandir(self.directory):
            if not entry.is_file() or entry.name.startswith("."):
                continue
            if self.suffix and not entry.name.endswith(self.suffix):
                continue
            names.append(entry.name[:len(entry.name) - len(self.suffix)])
        return sorted(names, key=lambda n: n.encode())

    def get(self, untrusted_name: str) -> bytes:
        path = self.path(untrusted_name)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise PolicyWriteError(f"Not found: {path.name}") from None
        return token_of(data).encode() + b"\n" + data

    def replace(self, untrusted_name: str, untrusted_payload: bytes) -> None:
        path = self.path(untrusted_name)
        token, sep, untrusted_data = untrusted_payload.partition(b"\n")
        if not sep:
            raise PolicyWriteError("the payload must start with a token line "
                                   "(any, new or sha256:...)")
        if len(untrusted_data) > MAX_CONTENT:
            raise PolicyWriteError(f"the policy is bigger than {MAX_CONTENT} bytes")
        try:
            text = untrusted_data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyWriteError("the policy is not valid UTF-8") from None
        with self._locked():
            self._check_token(token, path)
            self._validate(path, text)
            data = untrusted_data  # checked: it parses, with the rest of the policy
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)

    def remove(self, untrusted_name: str, untrusted_payload: bytes) -> None:
        path = self.path(untrusted_name)
        with self._locked():
            self._check_token(untrusted_payload.strip(b"\n"), path)
            if not path.is_file():
                raise PolicyWriteError(f"Not found: {path.name}")
            self._validate(path, None)
            path.unlink()
            _fsync_dir(path.parent)

    def _check_token(self, token: bytes, path: Path) -> None:
        if token == b"any":
            return
        if token == b"new":
            if os.path.lexists(path):
                raise PolicyTokenError(f"{path.name} exists but the token is 'new'")
            return
        if not token.startswith(b"sha256:"):
            raise PolicyWriteError("unrecognised token (any, new or sha256:...)")
        try:
            current = path.read_bytes()
        except OSError:
            raise PolicyTokenError(f"{path.name} does not exist, but the token "
                                   f"is not 'new'") from None
        if token_of(current).encode() != token:
            raise PolicyTokenError(f"{path.name} changed since it was read (token mismatch)")

    def _validate(self, path: Path, text: str | None) -> None:
        """Refuse a change that adds an error.  (A policy already broken by a file
        edited by hand can still be repaired through the API, one file at a time.)"""
        before = set(load_policy(self.policy_dir).errors)
        new = [e for e in load_policy(self.policy_dir, overrides={path: text}).errors
               if e not in before]
        if new:
            shown = "; ".join(new[:5]) + (f" (and {len(new) - 5} more)" if len(new) > 5 else "")
            raise PolicyWriteError(f"the policy would not load: {shown}")
