"""One call on a qube's agent link: a command or service dom0 runs in the qube, or a
qrexec call the qube makes (see :mod:`bulkhead.agentlink` for the link itself).

A call holds what the guest sent it -- bounded by the credit dom0 granted,
counted in bytes, one buffer per stream whatever the frames' sizes -- until
its consumer takes it, and sends what dom0 has for the guest only as far as
the guest's credit allows.  Everything here is driven by the link's read loop
(for what arrives) and by the call's consumer (for what leaves).
"""

from __future__ import annotations

import asyncio
import collections
import signal
from typing import TYPE_CHECKING, Union

from . import datadisk
from .errors import QubesException
from .guest import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from .agentlink import AgentLink


class AgentLinkError(QubesException):
    """The guest agent could not be reached, or broke the protocol."""


# What a call yields: ("stdout"|"stderr", bytes) -- for a call the qube made, ("stdin",
# bytes) and ("eof", "stdin") --, ("error", str) and finally ("exit", int)
CallEvent = tuple[str, Union[bytes, str, int]]


# What a call's guest sends, by who opened the call: dom0 (a command or service
# dom0 runs in the qube) or the guest (a qrexec call the qube makes).
_FROM_GUEST = {False: (P.STDOUT, P.STDERR), True: (P.STDIN,)}
STREAM_KIND = {P.STDOUT: "stdout", P.STDERR: "stderr", P.STDIN: "stdin"}


class Call:
    """One call on one channel of the link: a command or service dom0 runs in the
    qube, or (``inbound``) a qrexec call the qube makes to another qube.

    What the guest sends (output; for an inbound call, its input) is kept as
    one byte buffer per stream (bounded by the credit dom0 granted,
    :data:`~bulkhead.guest.protocol.WINDOW`); ERROR and EXIT (and, inbound,
    the end of the guest's input) wait in a short queue behind it, so the
    exit code comes after the last output.
    """

    def __init__(self, link: "AgentLink", chan: int, inbound: bool = False) -> None:
        self.link = link
        self.chan = chan
        self.inbound = inbound
        self._out = {mtype: bytearray() for mtype in _FROM_GUEST[inbound]}
        self._tail: collections.deque[CallEvent] = collections.deque()  # error, exit, eof
        self._wake = asyncio.Event()
        self.send_credit = P.WINDOW           # bytes we may still send the guest on this call
        self.window = P.WINDOW                # ...of which none are credited back yet
        self.data_slot: int | None = None     # our slot on the qube's data disk, if any
        self.data_pos = 0                     # where the next bytes go in that slot
        self.recv_granted = P.WINDOW          # bytes the guest may still send us on this call
        self.granted = 0                      # ...of which granted beyond the window (grant())
        self.credit_event = asyncio.Event()
        self.open_streams = set(_FROM_GUEST[inbound])
        self.done = False
        self.abandoned = False
        self.error_seen = False
        self.exit_code: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for this call (what it costs dom0's memory)."""
        return sum(len(buf) for buf in self._out.values())

    async def write(self, data: bytes, mtype: int = P.STDIN) -> None:
        """Send data (stdin; for an inbound call, STDOUT or STDERR), waiting for
        credit so that the guest never buffers without bound.

        The wait has no deadline of its own (a command may read its input late):
        whoever calls this must cancel it when its client goes away.
        """
        view = memoryview(data)
        while view:
            while self.send_credit <= 0:
                if self.done:
                    return
                self.credit_event.clear()
                await self.credit_event.wait()
            if self.done:
                return   # the guest ended the call: it would drop the bytes (and its slot is gone)
            disk = self.link.data_disk
            if disk is not None and len(view) >= datadisk.MIN_BYTES:
                if self.data_slot is None:
                    self.data_slot = disk.take()
                    if self.data_slot is not None:
                        self.send_credit += datadisk.SLOT - self.window
                        self.window = datadisk.SLOT
                if self.data_slot is not None:
                    pos = self.data_pos
                    n = min(len(view), self.send_credit, datadisk.SLOT - pos)
                    offset = disk.write(self.data_slot, pos, view[:n])
                    self.data_pos = (pos + n) % datadisk.SLOT
                    self.send_credit -= n
                    await self.link.send(P.DATA, self.chan, P.pack_data(mtype, offset, n))
                    view = view[n:]
                    continue
            n = min(len(view), self.send_credit, P.MAX_PAYLOAD)
            self.send_credit -= n
            await self.link.send(mtype, self.chan, bytes(view[:n]))
            view = view[n:]

    async def wait_credit(self, at_least: int) -> None:
        """Until the guest's credit lets ``at_least`` bytes (at most the window) go at
        once, or the call ended.

        A relay waits so before it takes more of the other side's bytes: what came
        meanwhile then goes as one DATA frame (or a few frames), where sending each
        piece as it came would cost the guest a disk read and a turn of its agent's
        loop per piece -- while it still had bytes to handle, so for nothing."""
        while self.send_credit < min(at_least, self.window) and not self.done:
            self.credit_event.clear()
            await self.credit_event.wait()

    async def grant(self, extra: int) -> None:
        """Let the guest send ``extra`` bytes more than the usual window on this call
        (what dom0 may hold for it grows by as much)."""
        if self.done or extra <= 0:
            return
        # The guest counts on it: past GRANT_MAX, credit means bytes read (its data disk's
        # chunks are reused by that rule; bulkhead.guest.datadisk).
        assert self.granted + extra <= P.GRANT_MAX, "grant beyond the protocol's GRANT_MAX"
        self.granted += extra
        self.recv_granted += extra
        await self.link.send(P.CREDIT, self.chan, P.u32(extra))

    def _release_data_slot(self) -> None:
        """The call is over: its slot on the data disk goes back once the guest cannot
        still be reading it (see :mod:`bulkhead.datadisk`)."""
        slot, self.data_slot = self.data_slot, None
        disk = self.link.data_disk
        if slot is None or disk is None:
            return
        if self.send_credit >= self.window:
            disk.release(slot)        # every byte credited: read already
        else:
            disk.release_after_ping(self.link, slot)

    async def close_stdin(self) -> None:
        if not self.done:
            await self.link.send(P.STDIN, self.chan, b"")

    async def signal(self, signum: int) -> None:
        if not self.done:
            await self.link.send(P.SIGNAL, self.chan, P.u32(signum))

    async def hang_up(self, grace: float) -> None:
        """The caller went away: tell the command, as a closed terminal would (SIGHUP,
        end of input); SIGKILL if it has not ended ``grace`` seconds later.  A guest
        that ignores even that keeps the channel, which counts against that qube's
        own limit of calls (and costs dom0 nothing)."""
        try:
            await self.signal(signal.SIGHUP)
            await self.close_stdin()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while not self.done and loop.time() < deadline:
                await asyncio.sleep(0.1)
            await self.signal(signal.SIGKILL)
        except AgentLinkError:
            pass  # the qube or its link is gone too

    async def finish(self, code: int, error: str | None = None) -> None:
        """End an inbound call: its output streams end, then ERROR (if any) and EXIT."""
        assert self.inbound
        if self.done:
            return
        self.done = True
        self._release_data_slot()
        self.link._retire(self)
        frames = b""
        if error:
            frames += P.pack(P.ERROR, self.chan, error.encode()[:P.PAYLOAD_LIMIT[P.ERROR]])
        frames += (P.pack(P.STDOUT, self.chan) + P.pack(P.STDERR, self.chan)
                   + P.pack(P.EXIT, self.chan, P.i32(code)))
        try:
            await self.link.send_frames(frames)
        except AgentLinkError:
            pass  # the caller's link is gone: nobody to tell

    async def next_event(self, limit: int = P.MAX_PAYLOAD) -> CallEvent:
        """The next output (up to ``limit`` bytes of what has come), error or exit.

        Consuming output grants the guest as much credit again.
        """
        while True:
            for mtype, buf in self._out.items():
                if buf:
                    chunk = bytes(buf[:limit])
                    del buf[:len(chunk)]
                    if not self.done:
                        self.recv_granted += len(chunk)
                        try:
                            await self.link.send(P.CREDIT, self.chan, P.u32(len(chunk)))
                        except AgentLinkError:
                            pass  # the link closed: _fail queued the error and exit
                    return STREAM_KIND[mtype], chunk
            if self._tail:
                return self._tail.popleft()
            self._wake.clear()
            await self._wake.wait()

    def abandon(self) -> None:
        """Nobody reads this call any more: drop its output and grant the guest no more credit.

        The call keeps its channel until the guest ends it (the caller hangs the
        command up); until then what the guest sends is counted against its
        credit and discarded, so it costs dom0 no memory.
        """
        self.abandoned = True
        for buf in self._out.values():
            buf.clear()

    def _output(self, mtype: int, untrusted_data: bytes) -> None:
        if not self.abandoned:
            self._out[mtype] += untrusted_data
            self._wake.set()

    def _event(self, event: CallEvent) -> None:
        self._tail.append(event)
        self._wake.set()

    def _fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.data_slot = None     # the link closed: the data disk starts afresh
            self.credit_event.set()
            self._event(("error", message))
            self._event(("exit", 255))
