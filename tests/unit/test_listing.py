"""qvm-ls against the real server: one GetAllOfAll for the whole listing, and the same
output from a daemon without that method (as Qubes' qubesd), one GetAll per qube."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from bulkhead.api import REGISTRY, Registry, load_methods
from bulkhead.client import App as ClientApp
from bulkhead.client import Connection
from bulkhead.tools import qvm_ls
from core_helpers import ServerThread, standard_system

BULK = "bulkhead.vm.property.GetAllOfAll"


class CountingConnection(Connection):
    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path)
        self.methods: list[str] = []

    def request(self, dest: str, method: str, arg: str | None = None,
                payload: bytes = b"") -> bytes:
        self.methods.append(method)
        return super().request(dest, method, arg, payload)


def _without_bulk() -> Registry:
    load_methods()
    older = Registry()
    for name in REGISTRY.names():
        if name != BULK:
            older._register(REGISTRY.lookup(name))  # type: ignore[arg-type]
    return older


async def _system(app: Any) -> None:
    await standard_system(app)
    app.domains["work"].kernelopts = "quiet a\\b"
    app.domains["work"].vcpus = 3


def _qvm_ls(home: Path, registry: Registry | None, argv: list[str]) -> tuple[str, list[str]]:
    home.mkdir()
    with ServerThread(home, setup=_system, registry=registry) as srv:
        conn = CountingConnection(srv.socket)
        out = io.StringIO()
        with redirect_stdout(out):
            assert qvm_ls.main(argv, app=ClientApp(conn)) == 0
    return out.getvalue(), conn.methods


def test_qvm_ls_with_and_without_the_bulk_method(tmp_path: Path) -> None:
    argv = ["-O", "name,state,class,label,template,netvm,vcpus,kernelopts,flags"]
    listing, methods = _qvm_ls(tmp_path / "new", None, argv)
    assert methods == ["admin.vm.List", BULK]
    assert listing.splitlines()[0].split() == ["NAME", "STATE", "CLASS", "LABEL", "TEMPLATE",
                                               "NETVM", "VCPUS", "KERNELOPTS", "FLAGS"]
    assert "work          Halted   AppVM       blue   debian-12  sys-firewall  3      " \
           "quiet a\\b   a-------\n" in listing
    older, methods = _qvm_ls(tmp_path / "old", _without_bulk(), argv)
    assert older == listing
    assert methods[:2] == ["admin.vm.List", BULK]  # refused: no such method
    assert methods[2:] == ["admin.vm.property.GetAll"] * 7
