"""Hostile clients: the server answers every bad request with an error and lives on."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from pathlib import Path
from typing import Any

from bulkhead.api import Limits
from core_helpers import ServerThread, error, raw_call, standard_system
from hostile import KNOWN_ERRORS, malformed

def test_a_thousand_malformed_requests(tmp_path: Path) -> None:
    rng = random.Random(1234)
    with ServerThread(tmp_path, setup=standard_system) as srv:
        before = srv.call("dom0", "admin.vm.List")
        assert before.startswith(b"0\0")
        counts: dict[str, int] = {}
        for i in range(1000):
            request = malformed(rng, i)
            reply = raw_call(srv.socket, request)
            exc_type, message = error(reply)
            assert exc_type in KNOWN_ERRORS, (request[:80], reply)
            assert message
            counts[exc_type] = counts.get(exc_type, 0) + 1
        assert counts["ProtocolError"] > 500
        # normal calls still work, and nothing was changed
        assert srv.call("dom0", "admin.vm.List") == before
        assert srv.call("work", "admin.vm.property.Get", "memory") == \
            b"0\0default=True type=int 400"
        assert srv.call("work", "admin.vm.feature.List") == b"0\0"
        assert srv.call("work", "admin.vm.property.Set", "memory", b"512") == b"0\0"
        assert not srv.server._connections  # every connection was closed


def test_connection_cap(tmp_path: Path) -> None:
    with ServerThread(tmp_path, limits=Limits(max_connections=8)) as srv:
        idle = []
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(srv.socket))
            idle.append(s)
        time.sleep(0.2)
        reply = raw_call(srv.socket, b"admin.vm.List+ dom0 name dom0\0")
        assert error(reply) == ("QubesException",
                                "Too many connections to the Admin API; try again later")
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while srv.server._connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.call("dom0", "admin.vm.List").startswith(b"0\0dom0 class=AdminVM")


def test_slow_client_times_out(tmp_path: Path) -> None:
    with ServerThread(tmp_path, limits=Limits(read_timeout=0.5)) as srv:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(srv.socket))
        s.sendall(b"admin.vm.List+ dom0 na")  # ...and never the rest
        started = time.monotonic()
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert time.monotonic() - started < 3
        assert error(reply)[0] == "ProtocolError" and "timeout" in error(reply)[1]
        s.close()
        # a header in time but a payload that never ends
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(srv.socket))
        s.sendall(b"admin.vm.feature.Set+f dom0 name dom0\0abc")
        assert error(s.recv(4096))[0] == "ProtocolError"
        s.close()


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "qubesd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with ServerThread(tmp_path) as srv:
        assert srv.call("dom0", "admin.vm.List").startswith(b"0\0")
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        from bulkhead.api import AdminServer
        import asyncio
        second = AdminServer(srv.app, path)
        try:
            asyncio.run(second.start())
        except FileExistsError:
            pass
        else:  # pragma: no cover
            raise AssertionError("a second server took over a live socket")
    assert not path.exists()


def test_slow_event_reader_is_disconnected(tmp_path: Path, monkeypatch: Any) -> None:
    from bulkhead.api import admin_events
    monkeypatch.setattr(admin_events, "MAX_QUEUED", 10)
    with ServerThread(tmp_path, setup=standard_system) as srv:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(srv.socket))
        s.sendall(b"admin.Events+ dom0 name dom0\0")
        s.shutdown(socket.SHUT_WR)  # ...and never reads
        time.sleep(0.2)
        assert len(srv.app._observers) == 1
        value = b"v" * 60000
        for i in range(40):
            assert srv.call("work", "admin.vm.feature.Set", f"f{i}", value) == b"0\0"
        deadline = time.monotonic() + 10
        while srv.app._observers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.app._observers == []  # dropped, instead of queueing without bound
        s.close()
        assert srv.call("work", "admin.vm.feature.Get", "f39") == b"0\0" + value


def _hanging_registry(release: asyncio.Event) -> Any:
    """The real methods plus one that waits on its qube until ``release`` (a stalled call)."""
    from bulkhead.api import load_methods
    from bulkhead.api.registry import REGISTRY, Registry

    load_methods()
    registry = Registry()
    registry._methods.update(REGISTRY._methods)

    @registry.method("test.Hang", dest="vm")
    async def hang(call: Any) -> None:
        await release.wait()

    return registry


def _open(sock_path: Path, request: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    s.sendall(request)
    s.shutdown(socket.SHUT_WR)
    return s


def test_a_qube_whose_calls_stall_exhausts_only_its_own_budget(tmp_path: Path) -> None:
    release = asyncio.Event()
    with ServerThread(tmp_path, setup=standard_system, registry=_hanging_registry(release),
                      limits=Limits(per_qube=4)) as srv:
        stalled = [_open(srv.socket, b"test.Hang+ dom0 name work\0") for _ in range(4)]
        time.sleep(0.2)
        reply = raw_call(srv.socket, b"test.Hang+ dom0 name work\0")
        exc_type, message = error(reply)
        assert exc_type == "QubesException" and "qube 'work' is over its budget of 4" in message
        # Every other qube, and dom0's own calls, are served as ever.
        assert srv.call("dom0", "admin.vm.List").startswith(b"0\0")
        assert srv.call("vault", "admin.vm.property.Get", "label").startswith(b"0\0")
        srv.loop.call_soon_threadsafe(release.set)   # the qube's calls end (at their deadline)
        for s in stalled:
            assert s.recv(100).startswith(b"0\0")
            s.close()
        deadline = time.monotonic() + 5
        while srv.server._per_qube and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.server._per_qube    # the budget is back once its calls end
        assert srv.call("work", "admin.vm.property.Get", "label").startswith(b"0\0")


def test_one_client_cannot_take_every_connection(tmp_path: Path) -> None:
    with ServerThread(tmp_path, limits=Limits(per_client=4)) as srv:
        idle = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(srv.socket))
            idle.append(s)
        time.sleep(0.2)
        exc_type, message = error(raw_call(srv.socket, b"admin.vm.List+ dom0 name dom0\0"))
        assert exc_type == "QubesException"
        assert message.startswith("Too many connections to the Admin API from this client (pid ")
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while srv.server._per_client and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.call("dom0", "admin.vm.List").startswith(b"0\0dom0 class=AdminVM")
