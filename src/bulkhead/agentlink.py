"""dom0's end of a qube's guest-agent link (the protocol is :mod:`bulkhead.guest.protocol`).

Everything that arrives here comes from inside a qube and is hostile until
checked.  The rules the guest must keep, and what breaking them costs it:

- only guest->dom0 message types, within each type's size limit;
- HELLO first, once, with our protocol version;
- output, exit codes and credits only for calls dom0 opened and that are
  still open, and no more output than the credit dom0 granted;

Any violation closes the link (logged with the reason); calls in progress
fail with a clear error; the daemon and every other qube carry on.  The next
request reconnects, and the guest agent, seeing dom0 come back, says HELLO
again.  Memory per link is bounded: one frame being parsed, and per call at
most :data:`~bulkhead.guest.protocol.WINDOW` bytes of unconsumed output.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Union

from .errors import QubesException
from .guest import protocol as P

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    READY = "ready"


class AgentLinkError(QubesException):
    """The guest agent could not be reached, or broke the protocol."""


FRAME_TIMEOUT = 10.0

# What a call yields: ("stdout"|"stderr", bytes), ("error", str), ("exit", int)
CallEvent = tuple[str, Union[bytes, str, int]]


class Call:
    """One command or service running in the qube, on one channel of the link."""

    def __init__(self, link: "AgentLink", chan: int) -> None:
        self.link = link
        self.chan = chan
        self.events: asyncio.Queue[CallEvent] = asyncio.Queue()
        self.send_credit = P.WINDOW           # stdin bytes we may still send
        self.recv_granted = P.WINDOW          # output bytes the guest may still send
        self.credit_event = asyncio.Event()
        self.open_streams = {P.STDOUT, P.STDERR}
        self.done = False
        self.error_seen = False
        self.exit_code: int | None = None

    async def write(self, data: bytes) -> None:
        """Send stdin data, waiting for credit so that the guest never buffers without bound."""
        view = memoryview(data)
        while view:
            while self.send_credit <= 0:
                if self.done:
                    return
                self.credit_event.clear()
                await self.credit_event.wait()
            n = min(len(view), self.send_credit, P.MAX_PAYLOAD)
            self.send_credit -= n
            await self.link.send(P.STDIN, self.chan, bytes(view[:n]))
            view = view[n:]

    async def close_stdin(self) -> None:
        if not self.done:
            await self.link.send(P.STDIN, self.chan, b"")

    async def signal(self, signum: int) -> None:
        if not self.done:
            await self.link.send(P.SIGNAL, self.chan, P.u32(signum))

    async def next_event(self) -> CallEvent:
        """The next output, error or exit; consuming output grants the guest more credit."""
        kind, value = await self.events.get()
        if kind in ("stdout", "stderr") and value and not self.done:
            assert isinstance(value, bytes)
            self.recv_granted += len(value)
            await self.link.send(P.CREDIT, self.chan, P.u32(len(value)))
        return kind, value

    def _fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.credit_event.set()
            self.events.put_nowait(("error", message))
            self.events.put_nowait(("exit", 255))


class AgentLink:
    """The link to one qube's agent over its virtio-serial port's unix socket."""

    def __init__(self, qube: str, socket_path: str) -> None:
        self.qube = qube
        self.socket_path = socket_path
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

    # --- connection ----------------------------------------------------------
    async def ensure_ready(self, timeout: float) -> None:
        """Connect if needed and wait for the agent's HELLO (at most ``timeout`` seconds)."""
        if self.state == LinkState.READY:
            return
        async with self._connect_lock:
            if self.state == LinkState.READY:
                return
            self.state = LinkState.CONNECTING
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
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
            self.state = LinkState.READY

    def close(self, reason: str) -> None:
        """Drop the link: every call in progress fails with ``reason``."""
        if self.state == LinkState.DISCONNECTED and not self.calls:
            return
        self.state = LinkState.DISCONNECTED
        if self._writer is not None:
            self._writer.close()
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
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(AgentLinkError(f"qube {self.qube!r}: {reason}"))
                fut.exception()
        self._pongs.clear()

    async def send(self, mtype: int, chan: int, payload: bytes = b"") -> None:
        writer = self._writer
        if writer is None or self.state != LinkState.READY:
            raise AgentLinkError(f"qube {self.qube!r}: the guest agent is not connected")
        async with self._send_lock:
            writer.write(P.pack(mtype, chan, payload))
            await writer.drain()

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

    async def request_shutdown(self) -> None:
        await self.send(P.SHUTDOWN, 0)

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
            self.violations += 1
            log.warning("qube %s: protocol violation from the guest agent: %s; closing the link",
                        self.qube, e)
            self.close(f"protocol violation: {e}")
        except (OSError, asyncio.IncompleteReadError) as e:
            self.close(f"read error: {e}")
        except asyncio.CancelledError:
            pass

    def _dispatch(self, mtype: int, chan: int, untrusted_payload: bytes,
                  hello: asyncio.Future[None]) -> None:
        if not hello.done():
            if mtype != P.HELLO:
                raise P.ProtocolViolation(f"{P.NAMES[mtype]} before HELLO")
            version = P.parse_u32(untrusted_payload)
            if version != P.VERSION:
                raise P.ProtocolViolation(f"agent speaks version {version}, dom0 speaks {P.VERSION}")
            assert self._writer is not None
            self._writer.write(P.pack(P.HELLO, 0, P.u32(P.VERSION)))
            hello.set_result(None)
            return
        if mtype == P.HELLO:
            # The agent restarted (init respawns it): the calls it had are gone.
            version = P.parse_u32(untrusted_payload)
            if version != P.VERSION:
                raise P.ProtocolViolation(f"restarted agent speaks version {version}, "
                                          f"dom0 speaks {P.VERSION}")
            log.info("qube %s: the guest agent restarted; %d call(s) in progress lost",
                     self.qube, len(self.calls))
            for call in self.calls.values():
                call._fail(f"qube {self.qube!r}: the guest agent restarted")
            self.calls.clear()
            assert self._writer is not None
            self._writer.write(P.pack(P.HELLO, 0, P.u32(P.VERSION)))
            return
        if mtype == P.PONG:
            fut = self._pongs.get(untrusted_payload)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        call = self.calls.get(chan)
        if call is None:
            raise P.ProtocolViolation(f"{P.NAMES[mtype]} for channel {chan}, which is not open")
        if mtype in (P.STDOUT, P.STDERR):
            if mtype not in call.open_streams:
                raise P.ProtocolViolation(f"{P.NAMES[mtype]} on channel {chan} after its end")
            if not untrusted_payload:
                call.open_streams.discard(mtype)
                return
            call.recv_granted -= len(untrusted_payload)
            if call.recv_granted < 0:
                raise P.ProtocolViolation(f"channel {chan} sent more output than its credit")
            call.events.put_nowait(("stdout" if mtype == P.STDOUT else "stderr", untrusted_payload))
        elif mtype == P.CREDIT:
            call.send_credit += P.parse_u32(untrusted_payload)
            if call.send_credit > P.WINDOW:
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
            call.events.put_nowait(("error", "".join(c if c.isprintable() else "?" for c in message)))
        elif mtype == P.EXIT:
            code = P.parse_i32(untrusted_payload)
            if not 0 <= code <= 255:
                raise P.ProtocolViolation(f"exit code {code} out of range")
            call.done = True
            call.exit_code = code
            call.credit_event.set()
            del self.calls[chan]
            call.events.put_nowait(("exit", code))
