"""``bulkhead.vm.Run``: qvm-run's command stream, relayed between a client and a qube's agent.

Qubes' Admin API is request/reply; running a command needs stdin, stdout and
stderr to flow both ways for as long as the command runs.  So after the header
``bulkhead.vm.Run dom0 name VM\\0`` the connection carries frames of
:mod:`bulkhead.guest.protocol` on channel 1:

- client -> daemon: one EXEC (``user\\0command``) or SERVICE
  (``user\\0service+arg\\0source``) frame first, then STDIN frames (empty =
  end of input) and SIGNAL frames;
- daemon -> client: STDOUT and STDERR frames (empty = end of that stream),
  ERROR (a message) and finally EXIT (the exit code).

A refusal before the command starts (unknown or halted qube, malformed first
frame) is an ordinary ``2\\0`` error reply instead.  Flow control towards the
client is the socket's own: the relay waits for each write to drain before it
takes more output from the qube, and the qube's credit waits with it.

Every wait here ends when the client goes away, whatever the qube does: a
client's hang-up is noticed even while its input waits for the qube's
credit; the call is then abandoned (its output dropped, no more credit) and
the command hung up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import select
import signal

from ..agentlink import AgentLinkError
from ..agentlink import Call as AgentCall
from ..errors import ProtocolError, QubesVMNotRunningError
from ..guest import protocol as P
from ..vm import validate_name
from .registry import Call, stream

log = logging.getLogger(__name__)

CHANNEL = 1
FIRST_FRAME_TIMEOUT = 30.0
HANGUP_POLL = 0.5     # seconds between checks that the client is still there
HANGUP_GRACE = 5.0    # seconds a hung-up command has to end before SIGKILL
CLIENT_TYPES = frozenset({P.EXEC, P.SERVICE, P.STDIN, P.SIGNAL, P.CREDIT})
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The next frame from the client on our channel; None at a clean end of stream."""
    try:
        header = await reader.readexactly(P.HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("the client closed the stream in the middle of a frame") from None
        return None
    try:
        mtype, chan, length = P.parse_header(header, CLIENT_TYPES)
    except P.ProtocolViolation as e:
        raise ProtocolError(str(e)) from None
    if chan != CHANNEL:
        raise ProtocolError(f"frames of bulkhead.vm.Run go on channel {CHANNEL}, not {chan}")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the client closed the stream in the middle of a frame") from None
    return mtype, payload


def _check_user(untrusted_user: str) -> str:
    if not USER_RE.match(untrusted_user):
        raise ProtocolError(f"invalid user name {untrusted_user[:40]!r}")
    return untrusted_user


@stream("bulkhead.vm.Run", dest="vm")
async def vm_run(call: Call, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    vm = call.dest
    try:
        first = await asyncio.wait_for(_read_frame(reader), FIRST_FRAME_TIMEOUT)
    except asyncio.TimeoutError:
        raise ProtocolError("no EXEC or SERVICE frame after the header") from None
    if first is None or first[0] not in (P.EXEC, P.SERVICE):
        raise ProtocolError("bulkhead.vm.Run must start with an EXEC or SERVICE frame")
    mtype, untrusted_payload = first
    try:
        if mtype == P.EXEC:
            untrusted_user, command = P.split_exec(untrusted_payload)
            user = _check_user(untrusted_user)
        else:
            untrusted_user, service, untrusted_source = P.split_service(untrusted_payload)
            user = _check_user(untrusted_user)
            # dom0's own qrexec-client may name the caller a service sees (as Qubes'
            # policy daemon does); it must be a qube's name.
            if untrusted_source != "dom0":
                validate_name(None, None, untrusted_source)
            source = untrusted_source
    except P.ProtocolViolation as e:
        raise ProtocolError(str(e)) from None
    if not vm.is_running():
        raise QubesVMNotRunningError(vm)
    link = await call.app.lifecycle.agent(vm)
    if mtype == P.EXEC:
        agent_call = await link.exec(user, command)
    else:
        agent_call = await link.service(user, service, source)
    await _relay(vm.name, agent_call, reader, writer)


async def _relay(qube: str, agent_call: AgentCall, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    # The client's side ends only when it hangs up (end of input is an empty
    # STDIN frame), so ``inbound`` finishing means nobody is listening any more.
    # ``inbound`` may be stuck waiting for the qube's credit, and then reads
    # nothing from the client; ``hangup`` notices the client going away anyway.
    inbound = asyncio.create_task(_client_to_qube(agent_call, reader))
    hangup = asyncio.create_task(_wait_hangup(writer))
    finished = False
    try:
        while True:
            event = asyncio.ensure_future(agent_call.next_event())
            await asyncio.wait({event, inbound, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                log.info("qube %s: the qvm-run client hung up; hanging up the command", qube)
                return
            kind, value = event.result()
            if kind == "stdout" or kind == "stderr":
                assert isinstance(value, bytes)
                writer.write(P.pack(P.STDOUT if kind == "stdout" else P.STDERR, CHANNEL, value))
            elif kind == "error":
                assert isinstance(value, str)
                writer.write(P.pack(P.ERROR, CHANNEL, value.encode()[:1024]))
            elif kind == "exit":
                assert isinstance(value, int)
                writer.write(P.pack(P.STDOUT, CHANNEL, b"") + P.pack(P.STDERR, CHANNEL, b"")
                             + P.pack(P.EXIT, CHANNEL, P.i32(value)))
                finished = True
            # A client that stops reading stops the qube's output here (and the
            # qube's credit with it); one that goes away ends the wait.
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait({drain, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                drain.cancel()
                log.info("qube %s: the qvm-run client went away; hanging up the command", qube)
                return
            drain.result()
            if finished:
                return
    except (ConnectionError, OSError):
        log.info("qube %s: the qvm-run client went away; hanging up the command", qube)
    finally:
        inbound.cancel()
        hangup.cancel()
        if not finished and not agent_call.done:
            # Nobody reads this call any more: it must cost dom0 nothing from now on.
            agent_call.abandon()
            asyncio.ensure_future(agent_call.hang_up(HANGUP_GRACE))


async def _client_to_qube(agent_call: AgentCall, reader: asyncio.StreamReader) -> None:
    try:
        while True:
            frame = await _read_frame(reader)
            if frame is None:
                await agent_call.close_stdin()
                return
            mtype, untrusted_payload = frame
            if mtype == P.STDIN:
                if untrusted_payload:
                    await agent_call.write(untrusted_payload)
                else:
                    await agent_call.close_stdin()
            elif mtype == P.SIGNAL:
                signum = P.parse_u32(untrusted_payload)
                if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL,
                              signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
                    await agent_call.signal(signum)
            # CREDIT from the client is allowed and ignored: the socket paces us.
    except (ProtocolError, P.ProtocolViolation) as e:
        log.warning("bulkhead.vm.Run: bad frame from the client: %s", e)
        await agent_call.signal(signal.SIGHUP)
    except (ConnectionError, OSError, asyncio.CancelledError, AgentLinkError):
        pass


async def _wait_hangup(writer: asyncio.StreamWriter) -> None:
    """Return once the client has closed its socket, even if nobody reads from it.

    asyncio learns of a peer's close only by reading, and the relay stops
    reading from a client whose input the qube does not take.  A unix
    socket whose peer closed polls as POLLHUP (a half-close does not), so a
    cheap poll every :data:`HANGUP_POLL` seconds tells.
    """
    sock = writer.get_extra_info("socket")
    if sock is None:
        await asyncio.Event().wait()  # not a socket (tests): never
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
    while not poller.poll(0):
        await asyncio.sleep(HANGUP_POLL)
