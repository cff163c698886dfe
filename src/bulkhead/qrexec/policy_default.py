"""The default policy shipped with Bulkhead, and installing it.

The files live in ``default-policy/`` inside the package.  Installing copies
each one that is missing and leaves the others alone: a file the user edited
stays as it is, and a new default file of a later version is added.  The
Qubes location ``/etc/qubes/policy.d`` becomes a link to the machine's own
instance (``/var/lib/bulkhead``), where Qubes users look for it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .policy import policy_dir_of
from .policy_write import write_atomically

#: the Qubes path that shows the machine's own instance's policy
ETC_POLICY_DIR = Path("/etc/qubes/policy.d")
DEFAULT_HOME = Path("/var/lib/bulkhead")
#: included files managed through admin.policy.include.* (Qubes' policy.d/include)
INCLUDE_DIR_NAME = "include"


def default_files() -> dict[str, bytes]:
    """Name -> content of every shipped default file."""
    root = resources.files("bulkhead.qrexec").joinpath("default-policy")
    return {entry.name: entry.read_bytes() for entry in root.iterdir()
            if entry.is_file() and not entry.name.startswith(".")}


def install_default_policy(policy_dir: Path) -> list[Path]:
    """Create the policy directory and copy the default files that are missing;
    the paths written (none on a second run)."""
    policy_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    (policy_dir / INCLUDE_DIR_NAME).mkdir(exist_ok=True, mode=0o755)
    written = []
    for name, content in sorted(default_files().items()):
        path = policy_dir / name
        if not os.path.lexists(path):
            write_atomically(path, content)
            written.append(path)
    return written


def link_etc_policy(policy_dir: Path, etc_dir: Path = ETC_POLICY_DIR) -> bool:
    """Make ``etc_dir`` a symlink to ``policy_dir`` unless something is there already
    (a real Qubes policy or the user's own choice is never replaced).  True if made."""
    if os.path.lexists(etc_dir):
        return False
    etc_dir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(policy_dir, etc_dir)
    return True


def ensure_policy(home: Path, etc_dir: Path = ETC_POLICY_DIR) -> list[Path]:
    """What ``bulkhead setup`` does for the policy: the defaults, and for the
    machine's own instance the /etc/qubes/policy.d link."""
    policy_dir = policy_dir_of(home)
    written = install_default_policy(policy_dir)
    if Path(home).absolute() == DEFAULT_HOME:
        link_etc_policy(policy_dir, etc_dir)
    return written
