"""The host packages Bulkhead needs, from Debian, installed if missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .progress import SetupError, console, step

# package -> why Bulkhead needs it (shown to the user before installing)
PACKAGES = {
    "qemu-system-x86": "runs every qube",
    "qemu-utils": "qemu-img: the qubes' disk images",
    "mmdebstrap": "builds the Debian template",
    "e2fsprogs": "mke2fs: the template's root filesystem",
    "linux-source-6.1": "the source of the qube kernel",
    "build-essential": "compiles the qube kernel, qrexec-client-vm and qfile-agent",
    "bc": "kernel build",
    "flex": "kernel build",
    "bison": "kernel build",
    "patch": "kernel build: our changes to the source (kernel/*.patch)",
    "libelf-dev": "kernel build (objtool)",
    "libssl-dev": "kernel build",
    "busybox-static": "the tiny initramfs of the boot benchmark",
    "iproute2": "dom0's network namespace",
    "cpio": "tests read the benchmark initramfs back",
    "bubblewrap": "bwrap: each qube's QEMU runs in a jail of its own",
    "xfsprogs": "mkfs.xfs: tests of the file-reflink pool on a loop-mounted XFS",
    # --- GUI (issue 10)
    "python3-xlib": "the GUI daemon draws the qubes' windows (for a system Python)",
    "xvfb": "tests and bench/gui.py: an X server as the user's display",
    "xdotool": "tests and bench/gui.py type into the qubes' windows",
}


def missing(packages: list[str]) -> list[str]:
    out = []
    for pkg in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            out.append(pkg)
    return out


def ensure_packages(log_dir: Path) -> None:
    todo = missing(list(PACKAGES))
    if not todo:
        console.print(f"[green]✓[/] host packages: all {len(PACKAGES)} present")
        return
    if os.geteuid() != 0:
        raise SetupError(f"these Debian packages are missing and installing them needs root: "
                         f"{' '.join(todo)}; run `apt-get install {' '.join(todo)}` as root, "
                         "or `bulkhead setup` as root")
    for pkg in todo:
        console.print(f"  installing [bold]{pkg}[/]: {PACKAGES[pkg]}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with step(f"Installing {len(todo)} Debian packages with apt-get") as s:
        s.run(["apt-get", "update", "-q"], log_dir / "apt.log", env=env, what="apt-get update")
        s.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *todo],
              log_dir / "apt.log", env=env, what="apt-get install")
        s.note = ", ".join(todo)
