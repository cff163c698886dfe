"""Where Bulkhead keeps things.

Every path derives from two environment variables so that tests can run many
independent instances side by side:

- ``BULKHEAD_HOME`` (default ``/var/lib/bulkhead``): the durable state, i.e. the
  store, the volumes and the kernels.
- ``BULKHEAD_SOCKET`` (default ``/run/qubesd.sock``, the path Qubes' own
  clients use): the Admin API socket.

``BULKHEAD_CACHE`` (default ``/var/cache/bulkhead``) is the build cache: the
qube kernel, the template image and the saved boot states built on it are
built once per machine and shared by every instance on it -- the README's
setup and the test suite's instances alike.

Every qvm-* tool imports this module for :func:`socket_path`, so it imports
little at start: pathlib, hashlib and dataclasses would cost each tool some
30 ms, and only the daemon and ``bulkhead setup`` need :class:`Paths`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

DEFAULT_HOME = "/var/lib/bulkhead"
DEFAULT_SOCKET = "/run/qubesd.sock"
DEFAULT_CACHE = "/var/cache/bulkhead"


def _absolute(path: str) -> str:
    # as Path.absolute() makes it: relative to the current directory
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def socket_path(env: Mapping[str, str] | None = None) -> str:
    """The Admin API socket: ``$BULKHEAD_SOCKET`` (absolute), else Qubes' path."""
    env = os.environ if env is None else env
    return _absolute(env.get("BULKHEAD_SOCKET") or DEFAULT_SOCKET)


class Paths(NamedTuple):
    """Where one instance keeps things: ``home``, ``socket``, ``cache`` and what derives
    from them (a NamedTuple rather than a frozen dataclass: see the module doc)."""

    home: Path
    socket: Path
    cache: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Paths":
        from pathlib import Path  # here, not at the top: see the module documentation

        env = os.environ if env is None else env
        home = Path(env.get("BULKHEAD_HOME") or DEFAULT_HOME).absolute()
        socket = Path(socket_path(env))
        cache = Path(env.get("BULKHEAD_CACHE") or DEFAULT_CACHE).absolute()
        return cls(home=home, socket=socket, cache=cache)

    # --- durable state -------------------------------------------------
    @property
    def store(self) -> Path:
        """The SQLite database holding every qube's definition."""
        return self.home / "qubes.db"

    @property
    def pools(self) -> Path:
        return self.home / "pools"

    @property
    def vm_kernels(self) -> Path:
        """Kernels qubes boot, one directory per version (Qubes: /var/lib/qubes/vm-kernels)."""
        return self.home / "vm-kernels"

    def vm_kernel_image(self, version: str) -> Path:
        """The image of dom0's qube kernel ``version`` (what the ``kernel`` property names)."""
        return self.vm_kernels / version / "vmlinux"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def pidfile(self) -> Path:
        return self.home / "daemon.pid"

    # --- runtime state (sockets, pidfiles of running QEMUs) ---------------
    @property
    def run(self) -> Path:
        """Per-instance runtime directory.

        Unix socket paths are limited to 107 bytes, and a test's
        ``$BULKHEAD_HOME`` can be long, so runtime files live under a short
        path derived from the home directory instead of inside it.  It is on
        /run (tmpfs): after a host reboot no VM is running, and none is found.
        """
        import hashlib  # here, not at the top: see the module documentation
        from pathlib import Path

        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:10]
        return Path("/run/bulkhead") / digest

    def qube_run_dir(self, name: str) -> Path:
        return self.run / "qubes" / name

    @property
    def netns_name(self) -> str:
        """Name of dom0's network namespace (``ip netns`` style), one per instance."""
        return "bulkhead-" + self.run.name


def paths() -> Paths:
    return Paths.from_env()
