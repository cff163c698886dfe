"""admin.vm.firewall.{Get,Set,Reload} and the address properties, against the daemon's
API with the fake lifecycle (no qube runs, so nothing is pushed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bulkhead.config import Paths
from core_helpers import ServerThread, error, ok, standard_system


@pytest.fixture
def fw_server(tmp_path: Path) -> Any:
    async def setup(app: Any) -> Any:
        await standard_system(app)
        app.paths = Paths.from_env({"BULKHEAD_HOME": str(tmp_path / "home")})
        return app
    with ServerThread(tmp_path, setup=setup) as srv:
        yield srv


def test_a_new_qube_has_one_accept_rule(fw_server: Any) -> None:
    assert ok(fw_server.call("work", "admin.vm.firewall.Get")) == "action=accept\n"


def test_set_stores_canonical_rules_and_get_hides_expired(fw_server: Any) -> None:
    payload = (b"action=drop dsthost=192.0.2.9 proto=tcp dstports=80\n"
               b"action=drop dst4=198.51.100.0/24 expire=1000\n"
               b"action=accept specialtarget=dns comment=resolve, please\n")
    assert fw_server.call("work", "admin.vm.firewall.Set", None, payload) == b"0\0"
    assert ok(fw_server.call("work", "admin.vm.firewall.Get")) == (
        "action=drop proto=tcp dst4=192.0.2.9/32 dstports=80-80\n"
        "action=accept specialtarget=dns comment=resolve, please\n")
    assert fw_server.call("work", "admin.vm.firewall.Reload") == b"0\0"


@pytest.mark.parametrize("payload", [b"action=maybe\n", b"proto=tcp\n",
                                     b"action=accept dstports=80\n", b"action=accept\xff\n"])
def test_set_refuses_a_bad_rule_and_keeps_the_old_ones(fw_server: Any, payload: bytes) -> None:
    assert error(fw_server.call("work", "admin.vm.firewall.Set", None, payload))[0] == \
        "QubesValueError"
    assert ok(fw_server.call("work", "admin.vm.firewall.Get")) == "action=accept\n"


def test_firewall_of_dom0_is_refused(fw_server: Any) -> None:
    assert error(fw_server.call("dom0", "admin.vm.firewall.Get"))[0] == "ProtocolError"


def test_address_properties(fw_server: Any) -> None:
    qid = int(ok(fw_server.call("work", "admin.vm.property.Get", "qid")).split()[-1])
    fw_qid = int(ok(fw_server.call("sys-firewall", "admin.vm.property.Get", "qid")).split()[-1])
    get = lambda vm, prop: ok(fw_server.call(vm, "admin.vm.property.Get", prop))  # noqa: E731
    assert get("work", "ip") == f"default=True type=str 10.137.0.{qid}"
    assert get("work", "visible_gateway") == f"default=True type=str 10.137.0.{fw_qid}"
    assert get("work", "visible_netmask") == "default=True type=str 255.255.255.255"
    assert get("work", "mac") == f"default=True type=str 00:16:3e:5e:6c:{qid:02x}"
    assert get("work", "dns") == "default=True type=str 10.139.1.1 10.139.1.2"
    assert get("vault", "ip") == "default=True type=str "
    assert get("sys-firewall", "gateway").endswith(f"10.137.0.{fw_qid}")
    assert error(fw_server.call("work", "admin.vm.property.Set", "ip", b"10.137.0.300"))[0] \
        == "QubesPropertyValueError"
