"""qvm-prefs and qubes-prefs: list with D/- markers, get, set, reset, errors."""

from __future__ import annotations

from bulkhead.tools import qubes_prefs, qvm_prefs
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")


def test_list_with_default_markers(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running")
    conn.expected_calls[("dom0", "admin.vm.property.List", None, b"")] = b"0\x00prop1\nprop2\n"
    conn.expected_calls[("dom0", "admin.vm.property.GetAll", None, b"")] = (
        b"0\x00prop1 default=True type=str value1\nprop2 default=False type=str value2\n")
    assert qvm_prefs.main(["dom0"], app=app) == 0
    assert capsys.readouterr().out == "prop1  D  value1\nprop2  -  value2\n"
    assert qvm_prefs.main(["dom0", "--hide-default"], app=app) == 0
    assert capsys.readouterr().out == "prop2  -  value2\n"
    conn.assert_all_called()


def test_list_shows_typed_values_and_unset(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted", "sys-firewall class=AppVM state=Running")
    conn.expected_calls[("work", "admin.vm.property.List", None, b"")] = (
        b"0\x00label\nnetvm\nvcpus\nkernelopts\n")
    conn.expected_calls[("work", "admin.vm.property.GetAll", None, b"")] = (
        b"0\x00kernelopts default=False type=str a\\nb\\\\c\n"
        b"label default=False type=label blue\n"
        b"netvm default=True type=vm sys-firewall\n"
        b"vcpus default=True type=int \n")
    assert qvm_prefs.main(["work"], app=app) == 0
    assert capsys.readouterr().out == ("kernelopts  -  a\nb\\c\n"
                                       "label       -  blue\n"
                                       "netvm       D  sys-firewall\n"
                                       "vcpus       U\n")


def test_missing_vmname(app, conn, capsys):
    assert qvm_prefs.main([], app=app) == 2
    assert capsys.readouterr().err == "qvm-prefs: error: the following arguments are required: VMNAME\n"


def test_no_such_domain_is_one_line(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running")
    assert qvm_prefs.main(["xyz"], app=app) == 2
    assert capsys.readouterr().err == "qvm-prefs: error: no such domain: 'xyz'\n"


def test_get_str_vm_and_none(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running", "vm1 class=AppVM state=Halted")
    conn.expected_calls[("dom0", "admin.vm.property.Get", "prop1", b"")] = b"0\x00default=True type=str value1"
    conn.expected_calls[("dom0", "admin.vm.property.Get", "prop2", b"")] = b"0\x00default=True type=vm vm1"
    conn.expected_calls[("dom0", "admin.vm.property.Get", "prop3", b"")] = b"0\x00default=True type=vm "
    for prop, expected in (("prop1", "value1\n"), ("prop2", "vm1\n"), ("prop3", "")):
        assert qvm_prefs.main(["dom0", prop], app=app) == 0
        assert capsys.readouterr().out == expected
    conn.assert_all_called()


def test_get_dash_becomes_underscore(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.property.Get", "default_user", b"")] = (
        b"0\x00default=True type=str user")
    assert qvm_prefs.main(["work", "default-user"], app=app) == 0
    assert capsys.readouterr().out == "user\n"


def test_set_property(app, conn):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running")
    conn.expected_calls[("dom0", "admin.vm.property.Set", "default_user", b"testuser")] = b"0\x00"
    assert qvm_prefs.main(["dom0", "default_user", "testuser"], app=app) == 0
    conn.assert_all_called()


def test_set_vm_property_to_none(app, conn):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.property.Set", "netvm", b"")] = b"0\x00"
    conn.expected_calls[("work", "admin.vm.property.Set", "user", b"none")] = b"0\x00"
    assert qvm_prefs.main(["work", "netvm", "None"], app=app) == 0
    assert qvm_prefs.main(["work", "user", "none"], app=app) == 0
    conn.assert_all_called()


def test_reset_to_default(app, conn):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.property.Reset", "netvm", b"")] = b"0\x00"
    assert qvm_prefs.main(["-D", "work", "netvm"], app=app) == 0
    conn.assert_all_called()


def test_invalid_property_get_and_set(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running")
    conn.expected_calls[("dom0", "admin.vm.property.Get", "no_such_property", b"")] = error(
        "QubesNoSuchPropertyError", "Invalid property 'no_such_property' of dom0")
    conn.expected_calls[("dom0", "admin.vm.property.Set", "no_such_property", b"value")] = error(
        "QubesNoSuchPropertyError", "Invalid property 'no_such_property' of dom0")
    assert qvm_prefs.main(["dom0", "no_such_property"], app=app) == 2
    assert capsys.readouterr().err == "qvm-prefs: error: no such property: 'no_such_property'\n"
    assert qvm_prefs.main(["dom0", "no_such_property", "value"], app=app) == 2
    assert capsys.readouterr().err == "qvm-prefs: error: no such property: 'no_such_property'\n"


def test_invalid_value_is_the_daemons_message(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.property.Set", "vcpus", b"lots")] = error(
        "QubesPropertyValueError", "Invalid value 'lots' for property 'vcpus' of 'work'")
    assert qvm_prefs.main(["work", "vcpus", "lots"], app=app) == 1
    assert capsys.readouterr().err == ("qvm-prefs: error: Invalid value 'lots' for property "
                                       "'vcpus' of 'work'\n")


def test_qubes_prefs_uses_global_properties(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.property.List", None, b"")] = b"0\x00clockvm\ndefault_netvm\n"
    conn.expected_calls[("dom0", "admin.property.GetAll", None, b"")] = (
        b"0\x00clockvm default=False type=vm sys-net\n"
        b"default_netvm default=False type=vm sys-firewall\n")
    assert qubes_prefs.main([], app=app) == 0
    assert capsys.readouterr().out == ("clockvm        -  sys-net\n"
                                       "default_netvm  -  sys-firewall\n")
    conn.expected_calls[("dom0", "admin.property.Get", "default_netvm", b"")] = (
        b"0\x00default=False type=vm sys-firewall")
    conn.expected_calls[("dom0", "admin.property.Set", "default_netvm", b"sys-net")] = b"0\x00"
    conn.expected_calls[("dom0", "admin.property.Reset", "clockvm", b"")] = b"0\x00"
    app.cache_enabled = False
    app.clear_cache()
    assert qubes_prefs.main(["default_netvm"], app=app) == 0
    assert capsys.readouterr().out == "sys-firewall\n"
    assert qubes_prefs.main(["default_netvm", "sys-net"], app=app) == 0
    assert qubes_prefs.main(["--default", "clockvm"], app=app) == 0
    conn.assert_all_called()
