"""admin.Events: a stream of every event, as it happens.

Called on dom0 it streams the events of every qube and of the app (whose
subject is empty); called on a qube, that qube's only.  The first event is
``connection-established``; the stream then stays open until the client
goes away.

Events are encoded when they fire (so later changes cannot alter them) and
queued for the connection; a client that stops reading and lets
:data:`MAX_QUEUED` events pile up is disconnected rather than allowed to
grow the daemon's memory (nor :data:`MAX_QUEUED_BYTES` of them).
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Any

from . import protocol
from .registry import Call, stream

log = logging.getLogger("bulkhead.api.events")

MAX_QUEUED = 4096
MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: how often an idle stream checks that its client is still there
HANGUP_CHECK_INTERVAL = 5.0


def _peer_gone(writer: asyncio.StreamWriter) -> bool:
    """True once the client closed its end.  (It shut down its write side right after
    the request, so reading cannot tell; POLLHUP can.)"""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP | select.POLLERR)
    return any(mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, mask in poller.poll(0))


@stream("admin.Events", arg=False)
async def events(call: Call, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    app = call.app
    only = None if call.dest.qid == 0 else call.dest
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED)
    overflow = asyncio.Event()
    queued_bytes = 0

    def observer(subject: Any, event: str, kwargs: dict[str, Any]) -> None:
        nonlocal queued_bytes
        if (only is not None and subject is not only) or overflow.is_set():
            return
        name = "" if subject is app else str(subject)
        frame = protocol.encode_event(name, event, kwargs)
        if queued_bytes + len(frame) > MAX_QUEUED_BYTES or queue.full():
            overflow.set()
            # Cut the connection now: the stream may be blocked writing to this client.
            writer.transport.abort()
            return
        queue.put_nowait(frame)
        queued_bytes += len(frame)

    app.add_observer(observer)
    try:
        writer.write(protocol.encode_event("", "connection-established", {}))
        await writer.drain()
        while not overflow.is_set():
            try:
                frame = await asyncio.wait_for(queue.get(), HANGUP_CHECK_INTERVAL)
            except asyncio.TimeoutError:
                if _peer_gone(writer) or writer.is_closing():
                    return
                continue
            queued_bytes -= len(frame)
            writer.write(frame)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        if overflow.is_set():
            log.warning("admin.Events client too slow: too many events queued; disconnected")
        app.remove_observer(observer)
