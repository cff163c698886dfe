"""The desktop user's access to the Admin API, as Qubes arranges it: the group ``qubes``.

The GUI (``qvm-start-daemon``) runs in the user's session as that user; the
Admin API socket is ``root:qubes 0660`` (see :mod:`bulkhead.api.server`), so
setup makes the group and adds the user who ran it through sudo.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

from .progress import console

GROUP = "qubes"


def ensure_group() -> None:
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        console.print(f"[green]✓[/] group {GROUP} created (the Admin API socket's group)")
    user = os.environ.get("SUDO_USER")
    if not user or user == "root":
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        return
    if user not in grp.getgrnam(GROUP).gr_mem:
        subprocess.run(["usermod", "-a", "-G", GROUP, user], check=True)
        console.print(f"[green]✓[/] {user} added to group {GROUP} (log in again for the GUI: "
                      "qvm-start-daemon)")
