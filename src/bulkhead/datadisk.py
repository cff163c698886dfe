"""dom0's end of a qube's data disk: the fast way for bulk bytes into and out of a qube.

Under TCG, host->guest virtio-serial moves ~19 MB/s, while a guest reads a
virtio-blk disk with O_DIRECT at GB/s (FACTS.md; measured again for this).  So
each qube that has a virtio-mmio transport to spare gets a small file of dom0's
as a *read-only* disk (serial :data:`~bulkhead.guest.protocol.DATA_DISK_SERIAL`).
A call's bulk bytes towards the qube -- a service's input, or on a call the
qube made, the service's output -- are written into a slot of that file and
announced with a DATA frame on the agent link; the control (credit, end of
file, exit code) stays on the link.  So a qvm-copy between two qubes crosses
the link out of the sender (the fast direction) and the disk into the target.

The other way, on a call the qube makes, the qube writes its input into its
own area of the disk (after dom0's: :data:`~bulkhead.guest.protocol.DATA_OUT_OFFSET`)
and sends DATA; dom0 reads the bytes as it handles the frame (:meth:`DataDisk.read_out`),
only inside that area and only as far as the call's credit goes, so they are
what a STDIN frame's would be: untrusted data, bounded.  (Under TCG this saves
the sending qube most of its CPU time: a 32 KiB virtio-serial write costs it a
copy, an allocation and a notification each.)

Safety: dom0 chooses the offsets in its own area, so nothing a qube says is read
from there (a qube that writes into it spoils only its own input).  Each call
that uses the disk has a slot of :data:`SLOT`
bytes, written round and round: the call's credit window becomes the slot's
size, so no byte the qube has not read yet is overwritten (the qube reads a
DATA frame's bytes when it handles the frame, and credits only bytes it has
handled).  A slot is free again once its call is over and either all its bytes
were credited or the qube answered a PING sent after the call's last frame
(it handles frames in order).  A qube that never answers keeps its slots: its
later calls go by frames, slower, and nobody else's.

microvm has 8 virtio-mmio transports; a qube uses one per disk and NIC plus
virtio-serial, rng and balloon.  A qube without one to spare (a netvm with two
NICs) has no data disk, and its calls' bytes go in frames as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .backend.base import DiskSpec, MachineSpec
from .guest import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from .agentlink import AgentLink

log = logging.getLogger(__name__)

#: one call's window on the data disk; bigger than the frames' window (P.WINDOW) so
#: that dom0 and the qube overlap more of their work
SLOT = P.DATA_MAX
#: calls that can use the disk at once (more go by frames)
SLOTS = 16
SIZE = P.DATA_DISK_SIZE
assert SLOT * SLOTS == P.DATA_IN_SIZE
#: writes smaller than this go in a frame: under TCG a disk read costs the qube more
#: than a few KiB more on virtio-serial
MIN_BYTES = 4096
#: microvm's virtio-mmio transports (FACTS.md), and those every qube uses besides its
#: disks and NICs: virtio-serial, rng, balloon
TRANSPORTS = 8
FIXED_TRANSPORTS = 3
FILE_NAME = "qrexec-data"
#: fallocate(2): give a range's pages back, the file's size unchanged
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def path_for(run: Path, qube: str) -> Path:
    """Where a qube's data disk lives while it runs, in the instance's run directory
    ``run`` (not the qube's own: its jail covers that with a tmpfs)."""
    return run / "data-disks" / qube


def with_data_disk(spec: MachineSpec, path: Path) -> MachineSpec:
    """``spec`` with its data disk at ``path`` added, if it has a transport to spare.

    Used for a qube's start, its saved boot's shape and the saved boot itself, so
    that they all have the same devices (a state restores only onto its own)."""
    if any(d.name == P.DATA_DISK_SERIAL for d in spec.disks):
        return spec
    if len(spec.disks) + len(spec.nics) + FIXED_TRANSPORTS >= TRANSPORTS:
        return spec
    return dataclasses.replace(spec, disks=(*spec.disks, disk_spec(path)))


def disk_spec(path: Path) -> DiskSpec:
    """The data disk as a device (the same for a start and a saved boot)."""
    return DiskSpec(P.DATA_DISK_SERIAL, path, "raw")   # writable: the qube's area


def has_data_disk(spec: MachineSpec) -> bool:
    return any(d.name == P.DATA_DISK_SERIAL for d in spec.disks)


def make_file(path: Path) -> None:
    """A fresh, sparse data disk (what it held before is nobody's business now)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)


class DataDisk:
    """The slots of one qube's data disk, for its agent link."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._free = list(range(SLOTS))
        self._generation = 0

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def write(self, slot: int, pos: int, data: memoryview) -> int:
        """Put ``data`` at ``pos`` in ``slot``; returns its offset on the disk."""
        assert 0 <= pos and pos + len(data) <= SLOT
        offset = slot * SLOT + pos
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        return offset

    def read_out(self, untrusted_offset: int, length: int) -> bytes:
        """The ``length`` bytes (checked by the caller: <= DATA_MAX) a qube's DATA names
        in its own area; a range outside it is a protocol violation."""
        if not (P.DATA_OUT_OFFSET <= untrusted_offset
                and untrusted_offset + length <= P.DATA_DISK_SIZE):
            raise P.ProtocolViolation(f"DATA at {untrusted_offset} (+{length}) outside the "
                                      f"qube's area of its data disk")
        data = os.pread(self.fd, length, untrusted_offset)
        if len(data) != length:
            raise P.ProtocolViolation("DATA beyond the end of the data disk")
        self._punch(untrusted_offset, length)   # read: its pages go back to the host
        return data

    def release(self, slot: int) -> None:
        self._punch(slot * SLOT, SLOT)          # read by the qube: likewise
        self._free.append(slot)

    def _punch(self, offset: int, length: int) -> None:
        """Give the pages of a range dom0 is done with back to the host: the file is
        on tmpfs, where every page once written stays allocated (up to SIZE a qube)."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) != 0:   # no harm: the pages stay, as before
            log.debug("cannot punch the data disk %s: %s", self.path,
                      os.strerror(ctypes.get_errno()))

    def release_after_ping(self, link: "AgentLink", slot: int) -> None:
        """Free ``slot`` once the qube has handled every frame sent so far."""
        generation = self._generation

        async def later() -> None:
            try:
                await link.ping(timeout=30.0)
            except Exception:  # noqa: BLE001 -- no answer: the slot stays taken (see above)
                return
            if generation == self._generation:
                self.release(slot)
        asyncio.ensure_future(later())

    def reset(self) -> None:
        """The link closed: the next agent (or the next connection) starts afresh."""
        self._generation += 1
        self._free = list(range(SLOTS))
        self._punch(0, P.DATA_DISK_SIZE)

    def close(self) -> None:
        """The qube stopped: the file goes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)
