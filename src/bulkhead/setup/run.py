"""``bulkhead setup``: from a fresh Debian 12 to a running daemon and the default qubes.

Idempotent and resumable: every step first looks whether its result is already
there (a package installed, a kernel or image in the cache, a qube defined),
so a second run only checks, in seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Paths
from . import host, kernel, qube_ids, service, template
from .progress import SetupError, console, step


def prepare(paths: Paths, install_packages: bool = True) -> tuple[Path, str, Path, str]:
    """Host packages, the qube kernel and the template images: everything but the daemon.

    Returns (kernel image, kernel version, debian-12's image, its key); the other
    templates' images (:data:`template.FLAVOURS`) are built and cached too.
    """
    for d in (paths.home, paths.cache, paths.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    if install_packages:
        host.ensure_packages(paths.log_dir)
    qube_ids.ensure_range()
    vmlinux = kernel.build(paths)
    kid = kernel.install(paths, vmlinux)
    template.verify_tools()
    image = template.build_image(paths)
    for flavour in template.FLAVOURS:
        if flavour != template.BASE:
            template.build_image(paths, flavour)
    return vmlinux, kid, image, template.image_key()


def daemon_answers(paths: Paths) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(paths.socket))
        # A real (harmless) request, so the daemon does not log a malformed one.
        s.sendall(b"admin.vm.List+ dom0 name dom0\0")
        s.shutdown(socket.SHUT_WR)
        return s.recv(2) == b"0\0"
    except OSError:
        return False
    finally:
        s.close()


def ensure_daemon(paths: Paths) -> None:
    if daemon_answers(paths):
        console.print(f"[green]✓[/] the daemon answers on {paths.socket}")
        return
    with step("Starting the Bulkhead daemon") as s:
        r = subprocess.run([sys.executable, "-m", "bulkhead.cli", "daemon", "--detach"],
                           env=os.environ.copy(), capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"the daemon did not start: {r.stderr.strip() or r.stdout.strip()}; "
                             f"its log is {paths.log_dir / 'daemon.log'}")
        deadline = time.monotonic() + 30
        while not daemon_answers(paths):
            if time.monotonic() > deadline:
                raise SetupError(f"the daemon did not answer on {paths.socket} within 30 s; "
                                 f"its log is {paths.log_dir / 'daemon.log'}")
            time.sleep(0.1)
        s.note = f"socket {paths.socket}"


def ensure_boot_state(app: Any, qube: str) -> None:
    """The saved boot state qubes of ``qube``'s kind start from (see bulkhead.bootstate):
    built now so that the first disposable is quick; found in the build cache when
    another instance on this host built it already."""
    if qube not in app.domains:
        return
    from ..errors import QubesException
    with step(f"Saved boot state for {qube}'s kind of qube") as s:
        try:
            s.note = app.call(qube, "bulkhead.vm.BootState", None, b"build").decode().strip()
        except QubesException as e:
            s.note = f"not built ({e}); qubes boot cold until it is"


def run_setup(paths: Paths, install_packages: bool = True, default_qubes: bool = True,
              uplink: str = "passt") -> int:
    from ..client.app import App
    from ..client.connection import Connection
    from ..tools import qvm_ls
    from .defaults import ensure_default_qubes, ensure_template

    from ..network.uplink import UplinkError, check_mode
    try:
        check_mode(uplink)
    except UplinkError as e:
        raise SetupError(f"--uplink: {e}") from None
    start = time.monotonic()
    _, kid, image, key = prepare(paths, install_packages)
    from ..qrexec.policy_default import ensure_policy
    ensure_policy(paths.home)  # the default qrexec policy; /etc/qubes/policy.d for the default home
    # Only for the machine's own instance: test instances start their own daemons.
    if paths.home == Paths.from_env({}).home:
        service.install_unit(paths)
        # --- GUI (issue 10): the desktop user reaches the Admin API through group qubes.
        from .desktop import ensure_group
        ensure_group()
    ensure_daemon(paths)
    app = App(Connection(str(paths.socket)))
    ensure_template(app, image, key, kid)
    if default_qubes:
        # sys-tor's template (a default qube's): its image was built and cached above.
        ensure_template(app, template.build_image(paths, template.TOR),
                        template.image_key(template.TOR), kid, template.TOR.name)
        ensure_default_qubes(app, uplink=uplink)
        ensure_boot_state(app, "default-dvm")
    console.print(f"[bold]Bulkhead is set up[/] in {time.monotonic() - start:.0f} s. "
                  f"Home: {paths.home}; Admin API: {paths.socket}")
    sys.stdout.flush()
    return qvm_ls.main([], app=App(Connection(str(paths.socket))))
