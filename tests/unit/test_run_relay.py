"""The daemon's qvm-run relay (bulkhead.api.run) between a client socket and a qube's
agent link: whatever the qube does, a client that goes away ends the call."""

from __future__ import annotations

import asyncio
import signal
import socket

from bulkhead.api import run as api_run
from bulkhead.guest import protocol as P
from fake_guest import WINDOW, open_exec, run, setup
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use


async def _client_pair() -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    """A connected client socket, and the daemon's streams on the other end."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=server)
    return client, reader, writer


def test_a_client_hang_up_is_noticed_while_its_input_waits_for_credit(sock_dir, monkeypatch):
    monkeypatch.setattr(api_run, "HANGUP_GRACE", 0.3)

    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        client, reader, writer = await _client_pair()
        relay = asyncio.create_task(api_run._relay("work", call, reader, writer))
        # More input than the window: the relay waits for the qube's credit, which
        # never comes, and stops reading the client meanwhile.
        stdin = b"".join(P.pack(P.STDIN, 1, b"s" * P.MAX_PAYLOAD)
                         for _ in range(16 * WINDOW // P.MAX_PAYLOAD))
        client.setblocking(False)
        pushing = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(client, stdin))
        taken = 0
        while taken < WINDOW:
            mtype, chan, payload = await end.recv()
            assert mtype == P.STDIN
            taken += len(payload)
        await asyncio.sleep(0.2)
        assert taken == WINDOW and not relay.done() and not pushing.done()
        pushing.cancel()
        client.close()                                   # the client goes away
        await asyncio.wait_for(relay, 3 * api_run.HANGUP_POLL + 1)
        assert call.abandoned
        # The command is hung up as a closed terminal would, then killed.
        assert await end.recv() == (P.SIGNAL, call.chan, P.u32(signal.SIGHUP))
        assert await end.recv() == (P.STDIN, call.chan, b"")
        assert await end.recv() == (P.SIGNAL, call.chan, P.u32(signal.SIGKILL))
        writer.close()
        guest.stop()
    run(scenario())


def test_a_client_that_stops_reading_holds_the_qube_to_its_window(sock_dir):
    async def scenario():
        guest, link, end = await setup(sock_dir)
        call = await open_exec(link, end)
        client, reader, writer = await _client_pair()
        relay = asyncio.create_task(api_run._relay("work", call, reader, writer))
        chunk = P.pack(P.STDOUT, call.chan, b"o" * P.MAX_PAYLOAD)
        await end.send_raw(chunk * (WINDOW // P.MAX_PAYLOAD))
        # The guest sends again whatever dom0 credits, until dom0 stops crediting
        # because the client's socket is full.
        while True:
            try:
                mtype, _, payload = await end.recv(timeout=0.5)
            except asyncio.TimeoutError:
                break
            assert mtype == P.CREDIT and P.parse_u32(payload) == P.MAX_PAYLOAD
            await end.send_raw(chunk)
        # dom0 holds one window for the call, and stopped granting credit.
        assert call.buffered == WINDOW
        await end.nothing_for(0.3)
        client.close()
        await asyncio.wait_for(relay, 3 * api_run.HANGUP_POLL + 1)
        assert call.abandoned and call.buffered == 0
        writer.close()
        guest.stop()
    run(scenario(), timeout=30)
