"""The qube kernel: built once from Debian's kernel source, cached, installed as dom0's.

As in Qubes, qubes boot a kernel that dom0 provides (the ``kernel`` property
names a directory under ``$BULKHEAD_HOME/vm-kernels``), not one from their
own disk.  Ours is Debian's 6.1 source configured with ``make tinyconfig`` plus
the fragment ``kernel/qube-kernel.config``: everything a qube needs built in
(virtio, ext4, nftables for firewall qubes, KVM guest and PVH entry), no
modules, no initramfs.  Under TCG it reaches init in about half the time and
memory of Debian's cloud kernel.  Building takes ~10 minutes on 2 cores, so
the result is cached under a key of the source version, the fragment and our
patches (``kernel/*.patch``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from ..config import Paths
from .progress import SetupError, console, step

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
RECIPE_VERSION = "1"   # bump when the build steps below change what they produce


def fragment_text() -> str:
    return resources.files("bulkhead").joinpath("kernel/qube-kernel.config").read_text()


def patches() -> list[tuple[str, str]]:
    """Our changes to Debian's source (``kernel/*.patch``, ``patch -p1``), by name.

    Each is small and says why at its top; today one: a cap on virtio-mmio queue
    sizes (``virtio_mmio.queue_max``), which saves ~10 MiB of every qube's memory.
    """
    folder = resources.files("bulkhead").joinpath("kernel")
    return sorted((f.name, f.read_text()) for f in folder.iterdir() if f.name.endswith(".patch"))


def source_version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise SetupError(f"{SOURCE_PACKAGE} is not installed; `bulkhead setup` installs it")
    return r.stdout.strip()


def kernel_id() -> str:
    """The version name of our kernel, e.g. ``6.1.158-1-bh3f2a9c1d`` (used as ``default_kernel``)."""
    recipe = RECIPE_VERSION + fragment_text() + "".join(n + t for n, t in patches())
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    return f"{source_version()}-bh{digest}"


def requested_options(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def check_config(config_text: str, wanted: dict[str, str]) -> list[str]:
    """Options of the fragment that did not survive ``olddefconfig`` (a dependency is missing)."""
    have = requested_options(config_text)
    bad = []
    for k, v in wanted.items():
        got = have.get(k, "n")
        if (v == "n" and got not in ("n", "")) or (v != "n" and got != v):
            bad.append(f"{k}={v} (got {got})")
    return bad


def build(paths: Paths, jobs: int | None = None) -> Path:
    """Build (or find cached) the qube kernel; returns the cached ``vmlinux``."""
    kid = kernel_id()
    out_dir = paths.cache / "kernels" / kid
    vmlinux = out_dir / "vmlinux"
    if vmlinux.exists():
        console.print(f"[green]✓[/] qube kernel {kid}: cached")
        return vmlinux
    if not SOURCE_TARBALL.exists():
        raise SetupError(f"{SOURCE_TARBALL} is missing; install {SOURCE_PACKAGE}")
    work = paths.cache / "kernel-build" / kid
    src = work / "linux-source-6.1"
    log = paths.log_dir / "kernel-build.log"
    jobs = jobs or (os.cpu_count() or 1) + 1
    with step(f"Building the qube kernel {kid} (about 10 minutes on 2 cores; once)") as s:
        if not (src / "Makefile").exists():
            shutil.rmtree(work, ignore_errors=True)
            unpack = work / ".unpack"
            unpack.mkdir(parents=True)
            s.update("unpacking the source")
            s.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(unpack)], log, what="tar")
            for name, text in patches():
                s.update(f"applying {name}")
                patch = work / name
                patch.write_text(text)
                s.run(["patch", "-p1", "--forward", "-i", str(patch)], log,
                      cwd=unpack / src.name, what=f"applying {name}")
            # Only a whole tree gets the name a later run takes as unpacked.
            os.rename(unpack / src.name, src)
        frag = work / "qube-kernel.config"
        frag.write_text(fragment_text())
        s.run(["make", "-s", "tinyconfig"], log, cwd=src, what="make tinyconfig")
        s.run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(frag)], log, cwd=src,
              what="merging the kernel config fragment")
        s.run(["make", "-s", "olddefconfig"], log, cwd=src, what="make olddefconfig")
        bad = check_config((src / ".config").read_text(), requested_options(frag.read_text()))
        if bad:
            raise SetupError("the kernel config fragment asks for options the kernel would not "
                             f"take (a dependency is missing): {', '.join(bad)}")
        s.run(["make", f"-j{jobs}", "vmlinux"], log, cwd=src, what="the kernel build")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "vmlinux.tmp"
        shutil.copyfile(src / "vmlinux", tmp)
        shutil.copyfile(src / ".config", out_dir / "config")
        os.replace(tmp, vmlinux)
        shutil.rmtree(work, ignore_errors=True)
        s.note = f"{vmlinux.stat().st_size // 1024} KiB"
    return vmlinux


def install(paths: Paths, vmlinux: Path) -> str:
    """Install a built kernel as one of dom0's qube kernels; returns its version name."""
    kid = vmlinux.parent.name
    dest = paths.vm_kernel_image(kid)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(vmlinux, tmp)
        os.replace(tmp, dest)
    return kid
