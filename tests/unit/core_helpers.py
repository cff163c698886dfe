"""Helpers for the management-core tests: a standard system, a server in a thread,
and a raw Admin API client that speaks the wire format byte for byte."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

from bulkhead.api import AdminServer, Limits, load_methods
from bulkhead.app import App
from bulkhead.lifecycle_fake import FakeLifecycle, fake_pool_factory
from bulkhead.store import Store
from hostile import raw_call  # noqa: F401 -- re-exported for the unit tests


def make_app(db: Path | None = None) -> App:
    app = App(lifecycle=FakeLifecycle(), pool_factory=fake_pool_factory)
    if db is not None:
        Store(db).attach(app)
    app.initialize()
    return app


async def standard_system(app: App) -> App:
    """What a fresh Qubes install has: debian-12, sys-net, sys-firewall, work, vault,
    default-dvm, with the global defaults pointing at them."""
    template = await app.create_vm("TemplateVM", name="debian-12", label="black")
    app.default_template = template
    sys_net = await app.create_vm("AppVM", name="sys-net", label="red")
    sys_net.provides_network = True
    sys_net.netvm = None
    sys_firewall = await app.create_vm("AppVM", name="sys-firewall", label="green")
    sys_firewall.provides_network = True
    sys_firewall.netvm = sys_net
    app.default_netvm = sys_firewall
    await app.create_vm("AppVM", name="work", label="blue")
    vault = await app.create_vm("AppVM", name="vault", label="black")
    vault.netvm = None
    dvm = await app.create_vm("AppVM", name="default-dvm", label="red")
    dvm.template_for_dispvms = True
    app.default_dispvm = dvm
    return app


def call(sock_path: str | Path, dest: str, method: str, arg: str | None = None,
         payload: bytes = b"") -> bytes:
    """A request exactly as qubesadmin's QubesLocal.qubesd_call sends it."""
    header = f"{method}+{arg or ''} dom0 name {dest}\0".encode("ascii")
    return raw_call(sock_path, header + payload)


def ok(reply: bytes) -> str:
    assert reply.startswith(b"0\0"), reply
    return reply[2:].decode()


def error(reply: bytes) -> tuple[str, str]:
    """(exception class, message) of an error reply."""
    assert reply.startswith(b"2\0"), reply
    _, exc_type, traceback, message, rest = reply.split(b"\0", 4)
    assert traceback == b"" and rest == b"", reply
    return exc_type.decode(), message.decode()


class ServerThread:
    """An App, its store and the Admin API server, on an event loop in a thread."""

    def __init__(self, home: Path, limits: Limits | None = None,
                 setup: Callable[[App], Awaitable[Any]] | None = None,
                 registry: Any = None) -> None:
        self.home = home
        self.registry = registry
        self.socket = home / "qubesd.sock"
        self.limits = limits
        self._setup = setup
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: App
        self.server: AdminServer

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        load_methods()
        self.app = make_app(self.home / "qubes.db")
        if self._setup is not None:
            await self._setup(self.app)
        self.server = AdminServer(self.app, self.socket, limits=self.limits,
                                  registry=self.registry)
        await self.server.start()

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def call(self, dest: str, method: str, arg: str | None = None, payload: bytes = b"") -> bytes:
        return call(self.socket, dest, method, arg, payload)

    def __exit__(self, *exc: Any) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if self.app.store is not None:
            self.app.store.close()
        self.loop.close()
