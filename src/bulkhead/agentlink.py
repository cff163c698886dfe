"""dom0's end of a qube's guest-agent link (the protocol is :mod:`bulkhead.guest.protocol`).

Everything that arrives here comes from inside a qube and is hostile until
checked.  The rules the guest must keep, and what breaking them costs it:

- only guest->dom0 message types, within each type's size limit;
- HELLO first, once, with our protocol version;
- output, exit codes and credits only for calls dom0 opened and that are
  still open, and no more output than the credit dom0 granted;

- control messages (a HELLO after the first: the agent restarted; a PONG
  nobody asked for) within a small budget (:data:`CONTROL_BURST`, then one
  per :data:`CONTROL_REFILL_SECONDS`): repeated past it, they are a violation;
- no empty CREDIT (it would cost dom0 work and carry nothing);
- read what dom0 sends: a send that cannot finish within :data:`SEND_TIMEOUT`
  closes the link.

Any violation closes the link (logged with the reason, within the qube's log
budget: :mod:`bulkhead.ratelimit`); calls in progress fail with a clear
error; the daemon and every other qube carry on.  The next request
reconnects -- after a pause that doubles with each violation in a row, so a
qube that breaks the protocol in a loop costs dom0 next to nothing -- and the
guest agent, seeing dom0 come back, says HELLO again.

What a qube can make dom0 hold is bounded in bytes, whatever the size of its
frames: one frame being parsed; per call at most
:data:`~bulkhead.guest.protocol.WINDOW` bytes of unconsumed output, kept as
one buffer per stream (a frame's bytes are appended, so a flood of 2-byte
frames costs what their payload costs, not an object each; a qrexec call dom0
relays to a qube with a data disk is granted 1 MiB: see bulkhead.qrexec.router); replies dom0
owes the guest within the control budget; and dom0's own sends wait for the
guest only up to :data:`SEND_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from typing import Awaitable, Callable

from .agentcall import STREAM_KIND, AgentLinkError, Call, CallEvent
from .datadisk import DataDisk
from .guest import protocol as P
from .ratelimit import TokenBucket, qube_log

__all__ = ["AgentLink", "AgentLinkError", "Call", "CallEvent", "LinkState"]

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    READY = "ready"


FRAME_TIMEOUT = 10.0
#: seconds dom0 waits for the guest to take a frame before it declares the link stalled
SEND_TIMEOUT = 30.0
#: control messages from the guest beyond the protocol's flow (HELLOs after the
#: first, unsolicited PONGs): this many at once, then one per CONTROL_REFILL_SECONDS
CONTROL_BURST = 8
CONTROL_REFILL_SECONDS = 10.0
#: after a violation dom0 reconnects only after 1, 2, 4 ... up to this many seconds
BACKOFF_MAX = 30.0
#: a link that stays READY this long without a violation starts its count afresh
CLEAN_SECONDS = 60.0
#: bytes of replies dom0 may owe a guest that is not reading them
REPLY_BUFFER_CAP = 64 * 1024
#: qrexec calls a qube may make: this many at once, then one per CALL_REFILL_SECONDS;
#: past that a call is refused (each costs a policy decision, maybe a qube's start)
CALL_BURST = 32
CALL_REFILL_SECONDS = 0.1
#: the exit code of a qrexec call that was refused (Qubes' qrexec-client-vm says 126)
REFUSED = 126
#: calls the guest opened and dom0 ended, remembered so that the frames the guest
#: sent before it learnt of the end are still checked against their credit
RETIRED_CALLS = 256

#: what handles a qrexec call a qube makes: (the call, untrusted target, untrusted service)
CallHandler = Callable[["Call", str, str], Awaitable[None]]



class AgentLink:
    """The link to one qube's agent over its virtio-serial port's unix socket."""

    def __init__(self, qube: str, socket_path: str, on_call: CallHandler | None = None,
                 data_disk: "DataDisk | None" = None) -> None:
        self.qube = qube
        self.data_disk = data_disk        # the qube's data disk, for bulk bytes into it
        self.socket_path = socket_path
        self.on_call = on_call
        self._call_budget = TokenBucket(CALL_BURST, CALL_REFILL_SECONDS)
        self._handlers: set[asyncio.Future[None]] = set()
        self._retired: collections.OrderedDict[int, Call] = collections.OrderedDict()
        self.state = LinkState.DISCONNECTED
        self.calls: dict[int, Call] = {}
        self._next_chan = 1
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._hello: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self.violations = 0
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self._control = TokenBucket(CONTROL_BURST, CONTROL_REFILL_SECONDS)
        self._streak = 0                  # violations in a row (see CLEAN_SECONDS)
        self._ready_at = 0.0
        self._retry_at = 0.0              # no reconnection before this loop time

    # --- connection ----------------------------------------------------------
    async def ensure_ready(self, timeout: float) -> None:
        """Connect if needed and wait for the agent's HELLO (at most ``timeout`` seconds)."""
        if self.state == LinkState.READY:
            return
        async with self._connect_lock:
            if self.state == LinkState.READY:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            if self._retry_at > loop.time():
                # The guest broke the protocol just now: let it wait, not dom0's CPU.
                if self._retry_at > deadline:
                    raise AgentLinkError(
                        f"qube {self.qube!r}: its guest agent broke the protocol {self._streak} "
                        f"time(s) in a row; dom0 reconnects in "
                        f"{self._retry_at - loop.time():.0f} s (see the daemon's log)")
                await asyncio.sleep(self._retry_at - loop.time())
            self.state = LinkState.CONNECTING
            try:
                while True:
                    try:
                        self._reader, self._writer = await asyncio.open_unix_connection(
                            self.socket_path, limit=P.MAX_PAYLOAD)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        if loop.time() > deadline:
                            raise
                        await asyncio.sleep(0.01)
                self._hello = loop.create_future()
                self._task = asyncio.create_task(self._read_loop(self._reader, self._hello))
                await asyncio.wait_for(asyncio.shield(self._hello), max(0.0, deadline - loop.time()))
            except (OSError, asyncio.TimeoutError) as e:
                self.close(f"no answer from the guest agent within {timeout:.0f} s")
                raise AgentLinkError(
                    f"qube {self.qube!r}: the guest agent did not answer within {timeout:.0f} s "
                    f"({type(e).__name__}); is it a Bulkhead qube with the agent installed?") from None
            except AgentLinkError:
                raise
            if self._writer is None:
                # The frames that came with the HELLO broke the protocol: the read
                # loop has closed the link already, and it must stay closed.
                raise AgentLinkError(f"qube {self.qube!r}: the guest agent broke the protocol "
                                     f"right after its HELLO; see the daemon's log")
            self.state = LinkState.READY
            self._ready_at = loop.time()

    async def connect_restored(self, timeout: float) -> None:
        """Connect to an agent that is being restored from a saved boot state.

        The saved agent had finished its HELLOs with the dom0 that saved it, and
        dom0 connects before the restore completes, so the guest never sees its
        port close: no HELLO comes, and the link is ready as soon as it connects
        (see :mod:`bulkhead.bootstate`).
        """
        async with self._connect_lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            self.state = LinkState.CONNECTING
            while True:
                try:
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        self.socket_path, limit=P.MAX_PAYLOAD)
                    break
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    if loop.time() > deadline:
                        self.state = LinkState.DISCONNECTED
                        raise AgentLinkError(f"qube {self.qube!r}: cannot connect to the "
                                             f"restored agent's port: {e}") from None
                    await asyncio.sleep(0.005)
            self._hello = loop.create_future()
            self._hello.set_result(None)
            self._task = asyncio.create_task(self._read_loop(self._reader, self._hello))
            self.state = LinkState.READY
            self._ready_at = loop.time()

    def close(self, reason: str) -> None:
        """Drop the link: every call in progress fails with ``reason``."""
        if self.state == LinkState.DISCONNECTED and not self.calls:
            return
        self.state = LinkState.DISCONNECTED
        if self._writer is not None:
            # abort, not close: close would keep what the guest did not read
            # buffered until it does, which a stalled guest never does.
            self._writer.transport.abort()
            self._writer = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(AgentLinkError(f"qube {self.qube!r}: {reason}"))
            self._hello.exception()  # mark retrieved: nobody may be waiting
        for call in self.calls.values():
            call._fail(f"qube {self.qube!r}: link to the guest agent closed: {reason}")
        self.calls.clear()
        for call in self._retired.values():
            call.data_slot = None
        self._retired.clear()
        if self.data_disk is not None:
            # The guest handles every frame of this connection before it says HELLO
            # to the next one: nothing it reads then was written for this one.
            self.data_disk.reset()
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(AgentLinkError(f"qube {self.qube!r}: {reason}"))
                fut.exception()
        self._pongs.clear()

    async def send(self, mtype: int, chan: int, payload: bytes = b"",
                   timeout: float | None = None) -> None:
        """Send one frame; a guest that does not take it within ``timeout`` (default
        :data:`SEND_TIMEOUT`) has stalled the link, which is then closed."""
        await self.send_frames(P.pack(mtype, chan, payload), timeout)

    async def send_frames(self, frame: bytes, timeout: float | None = None) -> None:
        """Send packed frames in one write (a call's end is four frames: one write and
        one wake-up of the guest, not four)."""
        writer = self._writer
        if writer is None or self.state != LinkState.READY:
            raise AgentLinkError(f"qube {self.qube!r}: the guest agent is not connected")
        limit = SEND_TIMEOUT if timeout is None else timeout
        try:
            await asyncio.wait_for(self._send_locked(writer, frame), limit)
        except asyncio.TimeoutError:
            reason = f"the guest did not read its port for {limit:.0f} s"
            if timeout is None:  # the link's own deadline: the guest stalled it
                qube_log(log, self.qube, logging.WARNING,
                         "qube %s: %s; closing the link", self.qube, reason)
                if self._writer is writer:
                    self.close(reason)
            raise AgentLinkError(f"qube {self.qube!r}: {reason}") from None

    async def _send_locked(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        async with self._send_lock:
            if writer.transport.is_closing():
                raise AgentLinkError(f"qube {self.qube!r}: the link to the guest agent closed")
            writer.write(frame)
            await writer.drain()

    def _reply(self, frame: bytes) -> None:
        """A reply the guest asked for (HELLO), written without waiting: the read
        loop must not block on the guest.  Bounded by the control budget and by
        :data:`REPLY_BUFFER_CAP` of what the guest has not read yet."""
        assert self._writer is not None
        if self._writer.transport.get_write_buffer_size() > REPLY_BUFFER_CAP:
            raise P.ProtocolViolation("the guest does not read the replies it asks for")
        self._writer.write(frame)

    # --- calls -------------------------------------------------------------------
    def _new_call(self) -> Call:
        if len(self.calls) >= P.MAX_CHANNELS:
            raise AgentLinkError(f"qube {self.qube!r}: too many calls in progress")
        while self._next_chan in self.calls or self._next_chan == 0:
            self._next_chan = (self._next_chan + 1) % 2**31
        call = Call(self, self._next_chan)
        self._next_chan = (self._next_chan + 1) % 2**31
        self.calls[call.chan] = call
        return call

    async def exec(self, user: str, command: str) -> Call:
        payload = user.encode() + b"\0" + command.encode()
        if len(user.encode()) > P.MAX_USER or len(command.encode()) > P.MAX_COMMAND:
            raise AgentLinkError("user name or command too long")
        call = self._new_call()
        await self._open(call, P.EXEC, payload)
        return call

    async def service(self, user: str, service: str, source: str) -> Call:
        if not P.valid_service_name(service):
            raise AgentLinkError(f"invalid service name {service!r}")
        payload = f"{user}\0{service}\0{source}".encode()
        if len(payload) > P.PAYLOAD_LIMIT[P.SERVICE]:
            raise AgentLinkError("user, service or source name too long")
        call = self._new_call()
        await self._open(call, P.SERVICE, payload)
        return call

    async def resume(self, payload: bytes) -> Call:
        """RESUME: a restored qube's own part of the boot, as a call (see bulkhead.bootstate)."""
        call = self._new_call()
        await self._open(call, P.RESUME, payload)
        return call

    async def _open(self, call: Call, mtype: int, payload: bytes) -> None:
        try:
            await self.send(mtype, call.chan, payload)
        except BaseException:
            self.calls.pop(call.chan, None)
            raise

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time to the agent, in seconds (the link's own latency, no process started)."""
        loop = asyncio.get_running_loop()
        self._ping_seq += 1
        nonce = self._ping_seq.to_bytes(8, "little")
        fut = self._pongs[nonce] = loop.create_future()
        start = loop.time()
        try:
            await self.send(P.PING, 0, nonce)
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pongs.pop(nonce, None)
        return loop.time() - start

    async def request_shutdown(self, timeout: float | None = None) -> None:
        await self.send(P.SHUTDOWN, 0, timeout=timeout)

    # --- reading -----------------------------------------------------------------
    async def _read_loop(self, reader: asyncio.StreamReader, hello: asyncio.Future[None]) -> None:
        frames = P.FrameReader(P.FROM_GUEST)
        loop = asyncio.get_running_loop()
        frame_deadline: float | None = None
        try:
            while True:
                if frames.mid_frame:
                    # A frame, once begun, must end soon: a qube that stops (or drips)
                    # half-way through would otherwise hold the link and what follows.
                    if frame_deadline is None:
                        frame_deadline = loop.time() + FRAME_TIMEOUT
                    try:
                        data = await asyncio.wait_for(reader.read(65536),
                                                      max(0.0, frame_deadline - loop.time()))
                    except asyncio.TimeoutError:
                        raise P.ProtocolViolation(
                            f"a frame was not completed within {FRAME_TIMEOUT:.0f} s") from None
                else:
                    frame_deadline = None
                    data = await reader.read(65536)
                if not data:
                    if frames.mid_frame:
                        raise P.ProtocolViolation("connection closed in the middle of a frame")
                    self.close("the guest closed the link")
                    return
                for mtype, chan, payload in frames.feed(data):
                    self._dispatch(mtype, chan, payload, hello)
        except P.ProtocolViolation as e:
            self._violation(str(e))
        except (OSError, asyncio.IncompleteReadError) as e:
            self.close(f"read error: {e}")
        except asyncio.CancelledError:
            pass

    def _violation(self, what: str) -> None:
        """Close the link for a protocol violation and hold off reconnecting for a while."""
        loop = asyncio.get_running_loop()
        self.violations += 1
        if self.state == LinkState.READY and loop.time() - self._ready_at > CLEAN_SECONDS:
            self._streak = 0
        self._streak += 1
        pause = min(BACKOFF_MAX, 2.0 ** (self._streak - 1))
        self._retry_at = loop.time() + pause
        qube_log(log, self.qube, logging.WARNING,
                 "qube %s: protocol violation from the guest agent: %s; closing the link "
                 "(reconnecting after %.0f s)", self.qube, what, pause)
        self.close(f"protocol violation: {what}")

    def _spend_control(self, what: str) -> None:
        if not self._control.take():
            raise P.ProtocolViolation(f"{what} repeated too often (at most {CONTROL_BURST}, "
                                      f"then one per {CONTROL_REFILL_SECONDS:.0f} s)")

    def _data_from_guest(self, call: Call, untrusted_payload: bytes) -> tuple[int, bytes]:
        """A qube's DATA (only on a call it made): the input bytes it put in its own
        area of its data disk, read now, before any later frame can be handled
        (:mod:`bulkhead.datadisk`); then they go on as a STDIN frame's would, held to
        the same end of stream and credit (a read of at most DATA_MAX comes first)."""
        if self.data_disk is None:
            raise P.ProtocolViolation("DATA from a qube that has no data disk")
        mtype, untrusted_offset, length = P.split_data(untrusted_payload, (P.STDIN,))
        return mtype, self.data_disk.read_out(untrusted_offset, length)

    def _inbound_call(self, chan: int, untrusted_payload: bytes) -> None:
        """The qube asks for a qrexec call (CALL on a channel of its own)."""
        if chan in self.calls:
            raise P.ProtocolViolation(f"CALL on channel {chan}, which is open already")
        self._retired.pop(chan, None)
        untrusted_target, untrusted_service = P.split_call(untrusted_payload)
        call = Call(self, chan, inbound=True)
        refusal = None
        if self.on_call is None:
            refusal = "qrexec calls from this qube are not served"
        elif len(self.calls) >= P.MAX_CHANNELS:
            refusal = "too many calls in progress"
        elif not self._call_budget.take():
            refusal = (f"too many qrexec calls (at most {CALL_BURST} at once, then one per "
                       f"{CALL_REFILL_SECONDS:g} s)")
        if refusal is not None:
            qube_log(log, self.qube, logging.WARNING, "qube %s: qrexec call to %s refused: %s",
                     self.qube, untrusted_target, refusal)
            self._reply(P.pack(P.ERROR, chan, refusal.encode()) + P.pack(P.EXIT, chan, P.i32(REFUSED)))
            call.done = True
            self._retire(call)
            return
        assert self.on_call is not None
        self.calls[chan] = call
        task = asyncio.ensure_future(self._handle_call(call, untrusted_target, untrusted_service))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _retire(self, call: Call) -> None:
        """An inbound call dom0 ended: out of the table, into the short memory of
        retired calls (the guest may have sent input before it learnt of the end)."""
        self.calls.pop(call.chan, None)
        call.abandon()
        self._retired[call.chan] = call
        while len(self._retired) > RETIRED_CALLS:
            self._retired.popitem(last=False)

    async def _handle_call(self, call: Call, untrusted_target: str, untrusted_service: str) -> None:
        assert self.on_call is not None
        try:
            await self.on_call(call, untrusted_target, untrusted_service)
        except Exception as e:  # noqa: BLE001 -- one call's failure must not reach the link
            log.exception("qube %s: qrexec call to %s failed", self.qube, untrusted_target)
            await call.finish(REFUSED, f"the call failed in dom0: {type(e).__name__}")
        finally:
            if not call.done:
                await call.finish(REFUSED, "the call ended without an exit code")

    def _dispatch(self, mtype: int, chan: int, untrusted_payload: bytes,
                  hello: asyncio.Future[None]) -> None:
        if not hello.done():
            if mtype != P.HELLO:
                raise P.ProtocolViolation(f"{P.NAMES[mtype]} before HELLO")
            version = P.parse_u32(untrusted_payload)
            if version != P.VERSION:
                raise P.ProtocolViolation(f"agent speaks version {version}, dom0 speaks {P.VERSION}")
            self._reply(P.pack(P.HELLO, 0, P.u32(P.VERSION)))
            hello.set_result(None)
            return
        if mtype == P.HELLO:
            # The agent restarted (init respawns it): the calls it had are gone.
            # Restarts are rare; a loop of them is a flood, and costs the qube its link.
            self._spend_control("HELLO")
            version = P.parse_u32(untrusted_payload)
            if version != P.VERSION:
                raise P.ProtocolViolation(f"restarted agent speaks version {version}, "
                                          f"dom0 speaks {P.VERSION}")
            qube_log(log, self.qube, logging.INFO,
                     "qube %s: the guest agent restarted; %d call(s) in progress lost",
                     self.qube, len(self.calls))
            for call in self.calls.values():
                call._fail(f"qube {self.qube!r}: the guest agent restarted")
            self.calls.clear()
            self._reply(P.pack(P.HELLO, 0, P.u32(P.VERSION)))
            return
        if mtype == P.PONG:
            fut = self._pongs.get(untrusted_payload)
            if fut is not None and not fut.done():
                fut.set_result(None)
            else:  # late (its ping timed out) or never asked for
                self._spend_control("unsolicited PONG")
            return
        if mtype == P.CALL:
            self._inbound_call(chan, untrusted_payload)
            return
        call = self.calls.get(chan) or self._retired.get(chan)
        if call is None:
            raise P.ProtocolViolation(f"{P.NAMES[mtype]} for channel {chan}, which is not open")
        if mtype == P.DATA:
            mtype, untrusted_payload = self._data_from_guest(call, untrusted_payload)
        if mtype in (P.STDOUT, P.STDERR, P.STDIN):
            if mtype not in call.open_streams:
                raise P.ProtocolViolation(f"{P.NAMES[mtype]} on channel {chan} after its end")
            if not untrusted_payload:
                call.open_streams.discard(mtype)
                if call.inbound:
                    call._event(("eof", STREAM_KIND[mtype]))
                return
            call.recv_granted -= len(untrusted_payload)
            if call.recv_granted < 0:
                raise P.ProtocolViolation(f"channel {chan} sent more output than its credit")
            call._output(mtype, untrusted_payload)
        elif mtype == P.CREDIT:
            credit = P.parse_u32(untrusted_payload)
            if credit == 0:
                raise P.ProtocolViolation(f"an empty CREDIT on channel {chan}")
            call.send_credit += credit
            if call.send_credit > call.window:
                raise P.ProtocolViolation(f"channel {chan} credited more than was sent")
            call.credit_event.set()
        elif mtype == P.ERROR:
            # One ERROR per call ("could not start; an EXIT follows"): more would be
            # output that escapes the credit window.
            if call.error_seen:
                raise P.ProtocolViolation(f"a second ERROR on channel {chan}")
            call.error_seen = True
            message = untrusted_payload.decode("utf-8", "replace")
            # Shown to the user as text: strip control characters a qube could use on a terminal.
            call._event(("error", "".join(c if c.isprintable() else "?" for c in message)))
        elif mtype == P.EXIT:
            code = P.parse_i32(untrusted_payload)
            if not 0 <= code <= 255:
                raise P.ProtocolViolation(f"exit code {code} out of range")
            call.done = True
            call.exit_code = code
            call.credit_event.set()
            call._release_data_slot()
            del self.calls[chan]
            call._event(("exit", code))
