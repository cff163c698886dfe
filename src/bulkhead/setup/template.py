"""Building the templates' root images from Debian's packages: ``debian-12``, and
``debian-12-tor`` (the same plus Debian's ``tor``: sys-tor's, the Tor gateway's).

Two cached stages, so that changing the guest agent does not mean downloading
Debian again:

1. **rootfs** (``$BULKHEAD_CACHE/rootfs/<key>``): ``mmdebstrap --variant=essential``
   with the packages below, a user ``user`` with password-less sudo as in
   Qubes, no docs/man pages/locales.  Keyed by the package list and recipe.
2. **image** (``$BULKHEAD_CACHE/templates/debian-12-<key>.qcow2``): a copy of the
   rootfs plus Bulkhead's guest files (the agent, busybox init and its boot
   scripts, the C programs of ``guest/c`` compiled), made into an ext4 filesystem by ``mke2fs -d`` and a qcow2.  Keyed
   by the rootfs key and the guest files' content.

``debian-12-tor`` is derived, not built again: its rootfs is a copy of
``debian-12``'s in which ``apt-get install tor`` ran (a few MB downloaded), keyed
by the base's key and its packages; its image adds a torrc that keeps Tor off
the network until the gateway is configured.  Both are cached like the base,
so a second setup (and every test instance) finds them.

The guest boots busybox init (``/usr/lib/bulkhead/init``): ``rc.sysinit``
mounts what Qubes mounts (``/rw`` with ``/home`` and ``/usr/local`` on it),
then the agent starts and says HELLO to dom0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from ..config import Paths
from .progress import SetupError, console, step

SUITE = "bookworm"
RECIPE_VERSION = "1"
ROOT_SIZE = 10 * 1024**3
PACKAGES = [
    "python3",          # the guest agent
    "busybox-static",   # init, and a fast /bin/sh for the boot scripts (static: no dynamic linking under TCG)
    "e2fsprogs",        # formats a new qube's private volume at its first start
    "passwd", "sudo",   # the user `user`, root through sudo as in Qubes
    "iproute2", "nftables",  # networking and firewall qubes
    "conntrack",        # a firewall qube flushes the connections its new rules forbid
    "apt", "procps",
    # --- GUI (issue 10): an X server with no screen, the GUI agent's X library, and
    # what a user tries first: a terminal, a text editor (xedit, in x11-apps), an
    # image viewer, a clipboard tool.  Mesa/LLVM, which libgl1 drags in for Xvfb's
    # unused GLX, is pruned below (Xvfb runs with -extension GLX).
    "xvfb", "xfonts-base", "python3-xlib", "xterm", "x11-apps", "xloadimage", "xclip",
]
DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*",
                 "/usr/share/locale/*", "/usr/share/lintian/*"]
# Run on the host with $1 = the new root; fixed text, no user input.
CUSTOMIZE_HOOKS = [
    'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
    'echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/qubes"',
    'chmod 0440 "$1/etc/sudoers.d/qubes"',
    'printf "127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n" > "$1/etc/hosts"',
    'mkdir -p "$1/rw" "$1/etc/qubes-rpc"',
    'rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"',
    # GUI: Mesa's drivers and LLVM (~170 MB) serve only GLX, which Xvfb runs without.
    'rm -rf "$1"/usr/lib/x86_64-linux-gnu/dri "$1"/usr/lib/x86_64-linux-gnu/libLLVM* '
    '"$1"/usr/lib/x86_64-linux-gnu/libgallium*',
]
# Guest files: (path in this package, path in the template, mode)
GUEST_FILES = [
    ("guest/__init__.py", "usr/lib/bulkhead/bulkhead_guest/__init__.py", 0o644),
    ("guest/protocol.py", "usr/lib/bulkhead/bulkhead_guest/protocol.py", 0o644),
    ("guest/agent.py", "usr/lib/bulkhead/bulkhead_guest/agent.py", 0o644),
    ("guest/spawn.py", "usr/lib/bulkhead/bulkhead_guest/spawn.py", 0o644),
    ("guest/services.py", "usr/lib/bulkhead/bulkhead_guest/services.py", 0o644),
    ("guest/restore.py", "usr/lib/bulkhead/bulkhead_guest/restore.py", 0o644),
    ("guest/caller.py", "usr/lib/bulkhead/bulkhead_guest/caller.py", 0o644),
    ("guest/datadisk.py", "usr/lib/bulkhead/bulkhead_guest/datadisk.py", 0o644),
    ("guest/filecopy.py", "usr/lib/bulkhead/bulkhead_guest/filecopy.py", 0o644),
    ("guest/files/qvm-copy", "usr/bin/qvm-copy", 0o755),
    ("guest/files/qvm-copy", "usr/bin/qvm-move", 0o755),
    ("guest/files/qvm-copy", "usr/bin/qvm-copy-to-vm", 0o755),
    ("guest/files/qvm-copy", "usr/bin/qvm-move-to-vm", 0o755),
    ("guest/files/qubes.Filecopy", "etc/qubes-rpc/qubes.Filecopy", 0o755),
    ("guest/files/qubes.VMShell", "etc/qubes-rpc/qubes.VMShell", 0o755),
    ("guest/files/qubes.VMExec", "etc/qubes-rpc/qubes.VMExec", 0o755),
    ("guest/fwrules.py", "usr/lib/bulkhead/bulkhead_guest/fwrules.py", 0o644),
    ("guest/netconf.py", "usr/lib/bulkhead/bulkhead_guest/netconf.py", 0o644),
    ("guest/dnsproxy.py", "usr/lib/bulkhead/bulkhead_guest/dnsproxy.py", 0o644),
    ("guest/torgw.py", "usr/lib/bulkhead/bulkhead_guest/torgw.py", 0o644),
    ("guest/openinvm.py", "usr/lib/bulkhead/bulkhead_guest/openinvm.py", 0o644),
    ("guest/files/qubes.OpenInVM", "etc/qubes-rpc/qubes.OpenInVM", 0o755),
    ("guest/files/qopen-in-vm", "usr/lib/bulkhead/qopen-in-vm", 0o755),
    ("guest/files/qvm-open-in-vm", "usr/bin/qvm-open-in-vm", 0o755),
    ("guest/files/qvm-open-in-vm", "usr/bin/qvm-open-in-dvm", 0o755),
    ("guest/files/qrexec-agent", "usr/lib/bulkhead/qrexec-agent", 0o755),
    ("guest/files/rc.sysinit", "usr/lib/bulkhead/rc.sysinit", 0o755),
    ("guest/files/rc.qube", "usr/lib/bulkhead/rc.qube", 0o755),
    ("guest/files/rc.shutdown", "usr/lib/bulkhead/rc.shutdown", 0o755),
    ("guest/files/inittab", "etc/inittab", 0o644),
    ("guest/files/fstab", "etc/fstab", 0o644),
    # --- GUI (issue 10)
    ("guest/gui_protocol.py", "usr/lib/bulkhead/bulkhead_guest/gui_protocol.py", 0o644),
    ("guest/gui_agent.py", "usr/lib/bulkhead/bulkhead_guest/gui_agent.py", 0o644),
    ("guest/gui_shm.py", "usr/lib/bulkhead/bulkhead_guest/gui_shm.py", 0o644),
    ("guest/gui_selection.py", "usr/lib/bulkhead/bulkhead_guest/gui_selection.py", 0o644),
    ("guest/files/gui-agent", "usr/lib/bulkhead/gui-agent", 0o755),
]
# Guest programs in C: (source in this package, path in the template).  Each runs
# once per qrexec call a qube makes, where a Python start would cost 0.2-0.45 s
# under TCG.  Compiled on the host (build-essential is there for the kernel) and
# linked statically, so they do not depend on the template's libc being the
# host's, and start without the dynamic loader.
GUEST_PROGRAMS = [
    ("guest/c/qrexec-client-vm.c", "usr/bin/qrexec-client-vm"),
    ("guest/c/qfile-agent.c", "usr/lib/bulkhead/qfile-agent"),
]
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2",
          "-fstack-protector-strong"]


@dataclasses.dataclass(frozen=True)
class Flavour:
    """A template built from the base: more packages (apt, in a copy of the base's
    root filesystem) and more files."""

    name: str
    packages: tuple[str, ...] = ()
    files: tuple[tuple[str, str, int], ...] = ()


BASE = Flavour("debian-12")
#: sys-tor's template, in the role of Whonix-Gateway's: Debian's tor and its torrc
TOR = Flavour("debian-12-tor", ("tor",), (("guest/files/torrc", "etc/tor/torrc", 0o644),))
FLAVOURS = (BASE, TOR)
# Run on the host with $1 = a copy of the base root; installs "$2..." from Debian.
ADD_PACKAGES = r"""set -e
root=$1; shift
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"   # start no service
chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$root/etc/resolv.conf" "$root/etc/resolv.conf.base" 2>/dev/null || true
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" apt-get -q update
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -q -y --no-install-recommends install "$@"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
mv "$root/etc/resolv.conf.base" "$root/etc/resolv.conf" 2>/dev/null || rm -f "$root/etc/resolv.conf"
"""


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:12]


def rootfs_key(flavour: Flavour = BASE) -> str:
    base = _digest(RECIPE_VERSION.encode(), SUITE.encode(), "\0".join(PACKAGES).encode(),
                   "\0".join(CUSTOMIZE_HOOKS + DPKG_EXCLUDES).encode())
    if flavour == BASE:
        return base
    return _digest(base.encode(), "\0".join(flavour.packages).encode(), ADD_PACKAGES.encode())


def _guest_file(rel: str) -> bytes:
    return resources.files("bulkhead").joinpath(rel).read_bytes()


def image_key(flavour: Flavour = BASE) -> str:
    return _digest(rootfs_key(flavour).encode(),
                   *(src.encode() + dst.encode() + _guest_file(src)
                     for src, dst, _ in GUEST_FILES + list(flavour.files)),
                   "\0".join(CFLAGS).encode(),
                   *(src.encode() + dst.encode() + _guest_file(src) for src, dst in GUEST_PROGRAMS))


def compile_program(src: str, out: Path) -> None:
    """Compile the guest program ``src`` (a path in this package) into ``out``."""
    with resources.as_file(resources.files("bulkhead").joinpath(src)) as source:
        r = subprocess.run(["gcc", *CFLAGS, "-o", str(out), str(source)],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"compiling {src} failed: {r.stderr.strip()[-2000:]}; "
                         "`apt-get install build-essential` if gcc is missing")


def mirrors() -> list[str]:
    """Debian sources for mmdebstrap, following the host's own mirror where it names one."""
    base = "http://deb.debian.org/debian"
    try:
        text = Path("/etc/apt/sources.list.d/debian.sources").read_text()
        for line in text.splitlines():
            if line.startswith("URIs:") and "security" not in line:
                base = line.split()[1].rstrip("/")
                break
    except OSError:
        pass
    security = base.rsplit("/", 1)[0] + "/debian-security" if base.endswith("/debian") else \
        "http://deb.debian.org/debian-security"
    return [f"deb {base} {SUITE} main", f"deb {base} {SUITE}-updates main",
            f"deb {security} {SUITE}-security main"]


def build_rootfs(paths: Paths, flavour: Flavour = BASE) -> Path:
    key = rootfs_key(flavour)
    dest = paths.cache / "rootfs" / f"{flavour.name}-{key}"
    if (dest / "usr/bin/python3").exists():
        console.print(f"[green]✓[/] {flavour.name} root filesystem {key}: cached")
        return dest
    if flavour != BASE:
        return _derive_rootfs(paths, flavour, dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    argv = ["mmdebstrap", "--variant=essential", "--mode=root", f"--include={','.join(PACKAGES)}"]
    argv += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
    argv += ["--dpkgopt=path-include=/usr/share/locale/locale.alias"]
    argv += [f"--customize-hook={h}" for h in CUSTOMIZE_HOOKS]
    argv += [SUITE, str(tmp), *mirrors()]
    with step(f"Building a Debian {SUITE} root filesystem with mmdebstrap (about a minute; once)") as s:
        s.run(argv, paths.log_dir / "template-build.log", what="mmdebstrap")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        s.note = f"{len(PACKAGES)} packages and their dependencies"
    return dest


def _derive_rootfs(paths: Paths, flavour: Flavour, dest: Path) -> Path:
    """The base's root filesystem, copied, with ``flavour``'s packages installed."""
    base = build_rootfs(paths, BASE)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log = paths.log_dir / "template-build.log"
    with step(f"Building {flavour.name}'s root filesystem: the base and "
              f"{', '.join(flavour.packages)} (once)") as s:
        s.run(["cp", "-a", "--reflink=auto", str(base), str(tmp)], log,
              what="copying the root filesystem")
        s.run(["sh", "-c", ADD_PACKAGES, "add-packages", str(tmp), *flavour.packages], log,
              what="apt-get install")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def build_image(paths: Paths, flavour: Flavour = BASE) -> Path:
    """Build (or find cached) a template's root image; returns the cached qcow2."""
    key = image_key(flavour)
    image = paths.cache / "templates" / f"{flavour.name}-{key}.qcow2"
    if image.exists():
        console.print(f"[green]✓[/] {flavour.name} template image {key}: cached")
        return image
    rootfs = build_rootfs(paths, flavour)
    log = paths.log_dir / "template-build.log"
    # Per process: two builds side by side (two checkouts sharing a cache) must not
    # copy into each other's staging tree.
    staging = paths.cache / "templates" / f"staging-{key}-{os.getpid()}"
    raw = staging.with_suffix(".raw")
    with step(f"Installing Bulkhead's guest agent and making the {flavour.name} image") as s:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        s.run(["cp", "-a", str(rootfs), str(staging)], log, what="copying the root filesystem")
        for src, dst, mode in GUEST_FILES + list(flavour.files):
            target = staging / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_guest_file(src))
            os.chmod(target, mode)
        s.update("compiling qrexec-client-vm and qfile-agent")
        for src, dst in GUEST_PROGRAMS:
            compile_program(src, staging / dst)
            os.chmod(staging / dst, 0o755)
        init = staging / "usr/lib/bulkhead/init"
        init.unlink(missing_ok=True)
        init.symlink_to("/bin/busybox")  # busybox runs as `init` when called by that name
        # Compile with the guest's own Python, so the bytecode matches it.
        s.run(["chroot", str(staging), "python3", "-m", "compileall", "-q", "/usr/lib/bulkhead"],
              log, what="compiling the guest agent")
        raw.unlink(missing_ok=True)
        s.run(["mke2fs", "-q", "-t", "ext4", "-L", "root", "-E", "root_owner=0:0",
               "-d", str(staging), str(raw), f"{ROOT_SIZE // 2**20}M"], log, what="mke2fs")
        tmp = image.with_suffix(f".tmp{os.getpid()}")
        s.run(["qemu-img", "convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536",
               str(raw), str(tmp)], log, what="qemu-img convert")
        os.replace(tmp, image)
        raw.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        s.note = f"{image.stat().st_size // 2**20} MiB"
    _prune(paths.cache / "templates", flavour, keep=image)
    return image


def _prune(directory: Path, flavour: Flavour, keep: Path, newest: int = 3) -> None:
    """Drop older images of this flavour: each is ~300 MiB.  The few newest stay, for
    other checkouts that share this cache and build another revision."""
    import re
    mine = re.compile(re.escape(flavour.name) + r"-[0-9a-f]{12}\.qcow2")
    images = sorted((p for p in directory.iterdir() if mine.fullmatch(p.name) and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for p in images[newest - 1:]:
        p.unlink(missing_ok=True)


def verify_tools() -> None:
    for tool in ("mmdebstrap", "mke2fs", "qemu-img", "chroot", "gcc"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is missing; `bulkhead setup` installs the packages it needs")
