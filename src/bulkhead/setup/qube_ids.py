"""The uids and gids of qubes' jailed QEMUs: a range reserved on the host once.

Each qube's QEMU runs under a uid and gid of its own (see
:mod:`bulkhead.backend.jail`).  They come from one range, recorded as
``bulkhead:BASE:COUNT`` in ``/etc/subuid`` and ``/etc/subgid``: the files in
which Debian's shadow tools (useradd, newusers) look for ranges already handed
out, so none of these ids is ever given to a user or a container.  Nothing
else is created: no passwd entries, the ids own nothing but qubes' images.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from ..backend import jail
from .progress import SetupError, console


def _overlaps(path: Path, base: int, count: int) -> str | None:
    """The first line of ``path`` (another owner's range) overlapping ours, if any."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] == jail.RANGE_OWNER:
            continue
        try:
            start, n = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start < base + count and base < start + n:
            return line
    return None


def ensure_range(subuid: Path = jail.SUBUID, subgid: Path = jail.SUBGID,
                 base: int = jail.DEFAULT_BASE, count: int = jail.DEFAULT_COUNT) -> jail.IdRange:
    """Reserve the range if it is not yet; returns it."""
    try:
        have = jail.read_range(subuid, subgid)
        console.print(f"[green]✓[/] qube uid range: {have.base}-{have.base + have.count - 1}")
        return have
    except jail.JailError:
        pass
    for path in (subuid, subgid):
        clash = _overlaps(path, base, count)
        if clash is not None:
            raise SetupError(f"the uid range for qubes ({base}+{count}) overlaps {clash!r} "
                             f"in {path}")
    users = [p.pw_name for p in pwd.getpwall() if base <= p.pw_uid < base + count]
    groups = [g.gr_name for g in grp.getgrall() if base <= g.gr_gid < base + count]
    if users or groups:
        raise SetupError(f"users or groups already use ids in the qube range {base}+{count}: "
                         f"{', '.join(users + groups)}")
    if os.geteuid() != 0:
        raise SetupError(f"reserving the qube uid range in {subuid} needs root")
    for path in (subuid, subgid):
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        tmp = path.with_name(path.name + ".bulkhead-tmp")
        tmp.write_text(text + f"{jail.RANGE_OWNER}:{base}:{count}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    console.print(f"[green]✓[/] qube uid range reserved: {base}-{base + count - 1} "
                  f"({subuid}, {subgid})")
    return jail.IdRange(base, count)
