"""The daemon as a system service, where systemd runs (in the role of Qubes' qubesd.service).

On a Debian laptop systemd is PID 1: setup installs :func:`unit_text` as
``/etc/systemd/system/bulkhead.service``, enables it (started at boot) and
starts it.  Where systemd does not run (containers, these test machines),
``bulkhead daemon --detach`` stays the way, as before.

Why the unit is as it is:

- ``Type=forking`` with ``--detach``: the parent returns only once the Admin
  API socket answers (after the qubes with ``autostart=True`` are started), so
  units ordered after this one find the daemon serving;
- ``Delegate=yes``: each qube's QEMU gets a cgroup of its own with limits
  (:mod:`bulkhead.backend.cgroup`) inside the subtree systemd hands the unit;
- ``KillMode=process``: stopping or restarting the daemon leaves the qubes
  running, and the next daemon adopts them, as it does without systemd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..config import Paths
from .progress import SetupError, console

UNIT_NAME = "bulkhead.service"
UNIT_DIR = Path("/etc/systemd/system")


def systemd_is_pid1() -> bool:
    """As sd_booted(3) tells: systemd creates /run/systemd/system when it boots as PID 1."""
    return Path("/run/systemd/system").is_dir()


def unit_text(paths: Paths, python: str = sys.executable) -> str:
    return f"""\
# Installed by `bulkhead setup`.  Bulkhead's daemon, in the role of Qubes' qubesd.service.
[Unit]
Description=Bulkhead daemon: the Admin API and every qube's machine
After=local-fs.target network-pre.target
Documentation=man:qvm-ls(1)

[Service]
Type=forking
Environment=BULKHEAD_HOME={paths.home}
Environment=BULKHEAD_SOCKET={paths.socket}
Environment=BULKHEAD_CACHE={paths.cache}
ExecStart={python} -m bulkhead.cli daemon --detach
PIDFile={paths.pidfile}
# Qubes' QEMUs live in cgroups of their own inside this unit's subtree.
Delegate=yes
# Stopping the daemon leaves the qubes running; the next daemon adopts them.
KillMode=process
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def install_unit(paths: Paths, unit_dir: Path = UNIT_DIR, run: bool = True) -> Path | None:
    """Install, enable and start the unit where systemd is PID 1; None elsewhere."""
    if not systemd_is_pid1():
        console.print("[green]✓[/] systemd is not PID 1 here: the daemon runs with "
                      "`bulkhead daemon --detach` (no unit installed)")
        return None
    dest = unit_dir / UNIT_NAME
    text = unit_text(paths)
    if not dest.exists() or dest.read_text() != text:
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    if run:
        for argv in (["systemctl", "daemon-reload"],
                     ["systemctl", "enable", "--now", UNIT_NAME]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise SetupError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    console.print(f"[green]✓[/] systemd unit {dest}: enabled")
    return dest
