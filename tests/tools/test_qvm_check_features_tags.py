"""qvm-check (exit codes 0/1/3), qvm-features, qvm-tags."""

from __future__ import annotations

from bulkhead.tools import qvm_check, qvm_features, qvm_tags
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")
THREE = vm_list("some-vm class=AppVM state=Running", "some-vm2 class=AppVM state=Running",
                "tpl class=TemplateVM state=Halted")


def test_check_exists(app, conn, capsys):
    conn.expected_calls[LIST] = THREE
    assert qvm_check.main(["some-vm"], app=app) == 0
    assert capsys.readouterr().err == "qvm-check: some-vm: exists\n"
    assert qvm_check.main(["-q", "some-vm", "some-vm2"], app=app) == 0
    assert capsys.readouterr().err == ""


def test_check_missing(app, conn, capsys):
    conn.expected_calls[LIST] = THREE
    assert qvm_check.main(["nope"], app=app) == 1
    assert capsys.readouterr().err == "qvm-check: nope: non-existent!\n"
    assert qvm_check.main(["some-vm", "nope"], app=app) == 1


def test_check_running_all_some_none(app, conn, capsys):
    conn.expected_calls[LIST] = THREE
    conn.expected_calls[("some-vm", "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Running"
    conn.expected_calls[("tpl", "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Halted"
    assert qvm_check.main(["--running", "some-vm"], app=app) == 0
    assert capsys.readouterr().err == "qvm-check: some-vm: running\n"
    assert qvm_check.main(["--running", "some-vm", "tpl"], app=app) == 3
    assert qvm_check.main(["--running", "tpl"], app=app) == 1
    assert capsys.readouterr().err.endswith("qvm-check: None of qubes: running\n")


def test_check_template_and_networked(app, conn):
    conn.expected_calls[LIST] = THREE
    assert qvm_check.main(["--template", "tpl"], app=app) == 0
    assert qvm_check.main(["--template", "some-vm"], app=app) == 1
    conn.expected_calls[("some-vm", "admin.vm.property.Get", "provides_network", b"")] = (
        b"0\x00default=True type=bool False")
    conn.expected_calls[("some-vm", "admin.vm.property.Get", "netvm", b"")] = (
        b"0\x00default=True type=vm sys-firewall")
    assert qvm_check.main(["--networked", "some-vm"], app=app) == 0


def test_check_paused(app, conn):
    conn.expected_calls[LIST] = THREE
    conn.expected_calls[("some-vm", "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Paused"
    assert qvm_check.main(["--paused", "some-vm"], app=app) == 0


# --- qvm-features -------------------------------------------------------------------

def test_features_list_get_set_unset(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.feature.List", None, b"")] = b"0\x00gui\nservice.cups\n"
    conn.expected_calls[("work", "admin.vm.feature.Get", "gui", b"")] = b"0\x001"
    conn.expected_calls[("work", "admin.vm.feature.Get", "service.cups", b"")] = b"0\x00"
    assert qvm_features.main(["work"], app=app) == 0
    assert capsys.readouterr().out == "gui           1\nservice.cups  \n"
    assert qvm_features.main(["work", "gui"], app=app) == 0
    assert capsys.readouterr().out == "1\n"
    conn.expected_calls[("work", "admin.vm.feature.Get", "nope", b"")] = error(
        "QubesFeatureNotFoundError", "Feature not set for domain work: nope")
    assert qvm_features.main(["work", "nope"], app=app) == 1
    assert capsys.readouterr().out == ""
    conn.expected_calls[("work", "admin.vm.feature.Set", "gui", b"")] = b"0\x00"
    assert qvm_features.main(["work", "gui", ""], app=app) == 0
    conn.expected_calls[("work", "admin.vm.feature.Remove", "gui", b"")] = b"0\x00"
    assert qvm_features.main(["--unset", "work", "gui"], app=app) == 0
    conn.expected_calls[("work", "admin.vm.feature.Remove", "nope", b"")] = error(
        "QubesFeatureNotFoundError", "Feature not set for domain work: nope")
    assert qvm_features.main(["-D", "work", "nope"], app=app) == 0
    conn.assert_all_called()


def test_features_usage_errors(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    assert qvm_features.main(["--unset", "work"], app=app) == 2
    assert capsys.readouterr().err == "qvm-features: error: --unset requires a feature\n"
    assert qvm_features.main(["--unset", "work", "a", "b"], app=app) == 2


# --- qvm-tags ---------------------------------------------------------------------------

def test_tags(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.tag.List", None, b"")] = b"0\x00zeta\nalpha\n"
    assert qvm_tags.main(["work"], app=app) == 0
    assert capsys.readouterr().out == "alpha\nzeta\n"
    assert qvm_tags.main(["work", "ls"], app=app) == 0
    assert capsys.readouterr().out == "alpha\nzeta\n"
    conn.expected_calls[("work", "admin.vm.tag.Get", "alpha", b"")] = b"0\x001"
    conn.expected_calls[("work", "admin.vm.tag.Get", "beta", b"")] = b"0\x000"
    assert qvm_tags.main(["work", "list", "alpha"], app=app) == 0
    assert capsys.readouterr().out == "alpha\n"
    assert qvm_tags.main(["work", "list", "beta"], app=app) == 1
    conn.expected_calls[("work", "admin.vm.tag.Set", "t1", b"")] = b"0\x00"
    conn.expected_calls[("work", "admin.vm.tag.Set", "t2", b"")] = b"0\x00"
    assert qvm_tags.main(["work", "add", "t1", "t2"], app=app) == 0
    conn.expected_calls[("work", "admin.vm.tag.Remove", "t1", b"")] = error(
        "QubesTagNotFoundError", "Tag not set for domain work: t1")
    assert qvm_tags.main(["work", "del", "t1"], app=app) == 0
    conn.assert_all_called()


def test_tags_add_needs_a_tag(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    assert qvm_tags.main(["work", "add"], app=app) == 2
    assert capsys.readouterr().err == "qvm-tags: error: add requires a TAG\n"
