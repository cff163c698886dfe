"""Storage pools and volumes: the interface every pool driver implements.

A qube has the volumes Qubes gives it, each configured per class:

========  ==============  ==============  ==============================
volume    TemplateVM /     AppVM           meaning
          StandaloneVM
========  ==============  ==============  ==============================
root      save_on_stop     snap_on_start   the system; an AppVM's is a fresh
                           (source: the    copy-on-write view of its template's
                           template root)  last committed root at every start
private   save_on_stop     save_on_stop    /rw, with /home on it
volatile  ephemeral        ephemeral       scratch, thrown away at every stop
kernel    read-only        read-only       dom0's kernel (LinuxKernel pool)
========  ==============  ==============  ==============================

- ``save_on_stop``: the running machine writes to a *dirty* copy; stopping
  commits it as the new current revision (the old one is kept as a revision,
  up to ``revisions_to_keep``), in constant time whatever the qube wrote; a
  crash mid-commit leaves the previous revision current, and a commit that
  fails keeps the dirty copy for the next start to run on.
- ``snap_on_start``: every start takes a fresh snapshot of ``source``'s last
  committed revision; stopping discards it.
- neither: a fresh empty volume every start (volatile).

Operations that touch the disk are coroutines: they run ``qemu-img`` and must
not block the daemon's event loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend.base import DiskSpec


@dataclass
class VolumeConfig:
    """What the qube's definition says about one of its volumes (stored in the store)."""

    name: str
    pool: str
    size: int                       # bytes
    rw: bool = True
    snap_on_start: bool = False
    save_on_stop: bool = False
    source: str | None = None       # "pool:vid" of the volume to snapshot (snap_on_start)
    revisions_to_keep: int = 1
    ephemeral: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Volume(abc.ABC):
    """One volume of one qube, in one pool."""

    def __init__(self, pool: "Pool", vid: str, config: VolumeConfig) -> None:
        self.pool = pool
        self.vid = vid              # pool-unique id, e.g. "appvms/work/private"
        self.config = config

    # --- what Qubes' admin.vm.volume.Info reports -------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def size(self) -> int:
        return self.config.size

    @property
    @abc.abstractmethod
    def usage(self) -> int:
        """Bytes actually allocated on disk."""

    @property
    def path(self) -> str:
        return ""

    @abc.abstractmethod
    def revisions(self) -> dict[str, str]:
        """Kept earlier revisions: revision id -> ISO time it was committed, oldest first."""

    def is_outdated(self) -> bool:
        """True if this snapshot was taken from an older revision of its source than the current one."""
        return False

    def info(self) -> dict[str, str]:
        """The ``key=value`` lines of ``admin.vm.volume.Info``, in Qubes' names."""
        c = self.config
        return {
            "pool": self.pool.name,
            "vid": self.vid,
            "size": str(self.size),
            "usage": str(self.usage),
            "rw": str(c.rw),
            "source": c.source or "",
            "path": self.path,
            "save_on_stop": str(c.save_on_stop),
            "snap_on_start": str(c.snap_on_start),
            "revisions_to_keep": str(c.revisions_to_keep),
            "ephemeral": str(c.ephemeral),
            "is_outdated": str(self.is_outdated()),
        }

    # --- lifecycle ------------------------------------------------------
    @abc.abstractmethod
    async def create(self) -> None:
        """Make the volume exist (empty, or as a snapshot source says) when its qube is created."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Delete the volume and all its revisions."""

    @abc.abstractmethod
    async def start(self) -> DiskSpec:
        """Prepare for the qube's start; returns the block device to give the machine."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """After the qube stopped: commit (save_on_stop) or discard (snapshot, ephemeral)."""

    @abc.abstractmethod
    def is_dirty(self) -> bool:
        """True while a started, not yet stopped, copy exists (the qube runs, or died uncommitted)."""

    @abc.abstractmethod
    async def revert(self, revision: str | None = None) -> None:
        """Make ``revision`` (default: the latest kept one) current again; the current is dropped."""

    @abc.abstractmethod
    async def resize(self, size: int) -> None:
        """Grow the volume to ``size`` bytes (shrinking is refused, as in Qubes)."""

    @abc.abstractmethod
    async def import_data(self, src: Path, size: int | None = None) -> None:
        """Replace the current content with the disk image ``src`` (a new revision)."""

    @abc.abstractmethod
    async def clone_from(self, other: "Volume") -> None:
        """Replace the current content with a copy of ``other``'s current content."""

    @abc.abstractmethod
    def committed_path(self) -> Path | None:
        """The current committed image (what a snapshot of this volume is taken from)."""


class Pool(abc.ABC):
    driver: str = ""

    def __init__(self, name: str, **config: Any) -> None:
        self.name = name
        self.config = config

    @abc.abstractmethod
    def init_volume(self, vid: str, config: VolumeConfig) -> Volume:
        """A Volume object for ``vid``; does not touch the disk."""

    @abc.abstractmethod
    def info(self) -> dict[str, str]:
        """The ``key=value`` lines of ``admin.pool.Info``."""

    @abc.abstractmethod
    async def setup(self) -> None:
        """Create the pool's directories; idempotent."""
