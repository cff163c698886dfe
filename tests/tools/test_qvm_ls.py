"""qvm-ls: Qubes' table format, filters, raw output; its calls (one admin.vm.List, one
bulkhead.vm.property.GetAllOfAll, and the fallbacks for a daemon without it)."""

from __future__ import annotations

from bulkhead.tools import qvm_ls
from toolfakes import error, get_all, get_all_of_all, vm_list

LISTING = vm_list("vm1 class=AppVM state=Running",
                  "template1 class=TemplateVM state=Halted",
                  "sys-net class=AppVM state=Running")


def props(label: str, template: str | None, netvm: str = "sys-net") -> bytes:
    values = {"label": f"default=False type=label {label}",
              "netvm": f"default=True type=vm {netvm}"}
    if template is not None:
        values["template"] = f"default=True type=vm {template}"
    return get_all(**values)


LIST = ("dom0", "admin.vm.List", None, b"")
BULK = ("dom0", "bulkhead.vm.property.GetAllOfAll", None, b"")

THREE = {"sys-net": props("red", "template1"), "template1": props("black", None),
         "vm1": props("green", "template1")}


def getall_key(name: str) -> tuple:
    return (name, "admin.vm.property.GetAll", None, b"")


def setup_three(conn) -> None:
    conn.expected_calls[LIST] = LISTING
    conn.expected_calls[BULK] = get_all_of_all(THREE)


def setup_three_per_qube(conn, bulk_reply: bytes) -> None:
    """A daemon that answers ``bulk_reply`` to GetAllOfAll, and each qube's GetAll."""
    conn.expected_calls[LIST] = LISTING
    conn.expected_calls[BULK] = bulk_reply
    for name, reply in THREE.items():
        conn.expected_calls[getall_key(name)] = reply


THREE_TABLE = ("NAME       STATE    CLASS       LABEL  TEMPLATE   NETVM\n"
               "sys-net    Running  AppVM       red    template1  sys-net\n"
               "template1  Halted   TemplateVM  black  -          sys-net\n"
               "vm1        Running  AppVM       green  template1  sys-net\n")


def test_default_columns_exactly_as_qubes(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main([], app=app) == 0
    assert capsys.readouterr().out == THREE_TABLE
    conn.assert_all_called()


def test_two_calls_for_the_whole_listing(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main([], app=app) == 0
    assert conn.calls == [LIST, BULK]


def test_bulk_method_refused_falls_back_to_one_getall_per_qube(app, conn, capsys):
    # Qubes' qubesd (or an older Bulkhead) has no GetAllOfAll
    setup_three_per_qube(conn, error("ProtocolError",
                                     "no such method: 'bulkhead.vm.property.GetAllOfAll'"))
    assert qvm_ls.main([], app=app) == 0
    assert capsys.readouterr().out == THREE_TABLE
    conn.assert_all_called()
    assert conn.calls.count(BULK) == 1
    assert sorted(conn.calls[2:]) == sorted(getall_key(name) for name in THREE)


def test_bulk_method_denied_by_policy_falls_back(app, conn, capsys):
    # through qrexec, a call the policy denies gets an empty reply
    setup_three_per_qube(conn, b"")
    assert qvm_ls.main(["--raw-data", "-O", "name,label"], app=app) == 0
    assert capsys.readouterr().out == "sys-net|red\ntemplate1|black\nvm1|green\n"
    conn.assert_all_called()


def test_bulk_refusal_is_remembered(app, conn, capsys):
    setup_three_per_qube(conn, error("ProtocolError", "no such method"))
    assert qvm_ls.main(["--raw-list", "--label", "red"], app=app) == 0
    app.domains.clear_cache()
    for vm in app.domains:
        vm.clear_cache()
    assert qvm_ls.main(["--raw-list", "--label", "red"], app=app) == 0
    assert capsys.readouterr().out == "sys-net\nsys-net\n"
    assert conn.calls.count(BULK) == 1
    assert conn.calls.count(getall_key("vm1")) == 2


def test_nonsense_reply_to_the_bulk_call_is_not_hidden(app, conn, capsys):
    conn.expected_calls[LIST] = LISTING
    conn.expected_calls[BULK] = b"1\x00"  # not a reply: falling back would not help
    assert qvm_ls.main([], app=app) == 1
    assert capsys.readouterr().err == "qvm-ls: error: invalid reply from the daemon\n"
    assert conn.calls == [LIST, BULK]


def test_escaped_and_empty_values_from_the_bulk_reply(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running",
                                        "work class=AppVM state=Halted")
    conn.expected_calls[BULK] = (
        b"0\x00dom0 kernelopts default=True type=str \n"
        b"dom0 label default=False type=label black\n"
        b"work kernelopts default=False type=str a\\nb\\\\c\n"
        b"work label default=False type=label blue\n"
        b"work vcpus default=True type=int \n")
    assert qvm_ls.main(["--raw-data", "-O", "name,label,kernelopts,vcpus"], app=app) == 0
    assert capsys.readouterr().out == "dom0|black|-|-\nwork|blue|a\nb\\c|-\n"
    work = app.domains["work"]
    assert work.kernelopts == "a\nb\\c"
    assert not work.property_is_default("kernelopts")
    assert work.property_list() == ["kernelopts", "label", "vcpus"]
    assert conn.calls == [LIST, BULK]


def test_malformed_bulk_reply(app, conn, capsys):
    conn.expected_calls[LIST] = LISTING
    conn.expected_calls[BULK] = b"0\x00vm1 label\n"
    assert qvm_ls.main([], app=app) == 1
    assert capsys.readouterr().err.startswith(
        "qvm-ls: error: malformed bulkhead.vm.property.GetAllOfAll line 'vm1 label'")


def test_selected_names(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main(["vm1", "sys-net"], app=app) == 0
    assert capsys.readouterr().out == (
        "NAME     STATE    CLASS  LABEL  TEMPLATE   NETVM\n"
        "sys-net  Running  AppVM  red    template1  sys-net\n"
        "vm1      Running  AppVM  green  template1  sys-net\n")
    assert conn.calls == [LIST, BULK]


def test_qube_missing_from_the_bulk_reply_gets_its_own_getall(app, conn, capsys):
    # created between admin.vm.List and GetAllOfAll's answer... or removed and made again
    setup_three(conn)
    conn.expected_calls[BULK] = get_all_of_all({"sys-net": THREE["sys-net"],
                                                "template1": THREE["template1"]})
    conn.expected_calls[getall_key("vm1")] = THREE["vm1"]
    assert qvm_ls.main([], app=app) == 0
    assert capsys.readouterr().out == THREE_TABLE
    assert conn.calls == [LIST, BULK, getall_key("vm1")]


def test_wildcards_and_raw_list(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list(
        "dom0 class=AdminVM state=Running", "fedora-41 class=TemplateVM state=Halted",
        "fedora-41-xfce class=TemplateVM state=Halted", "debian-12 class=TemplateVM state=Halted")
    assert qvm_ls.main(["--raw-list", "fedora*"], app=app) == 0
    assert capsys.readouterr().out == "fedora-41\nfedora-41-xfce\n"
    assert qvm_ls.main(["--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "debian-12\ndom0\nfedora-41\nfedora-41-xfce\n"


def test_raw_data_and_fields(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main(["--raw-data", "-O", "name,state,label"], app=app) == 0
    assert capsys.readouterr().out == ("sys-net|Running|red\n"
                                       "template1|Halted|black\n"
                                       "vm1|Running|green\n")


def test_property_column_underscore_and_missing_value(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list(
        "dom0 class=AdminVM state=Running", "work class=AppVM state=Running")
    conn.expected_calls[BULK] = get_all_of_all({
        "dom0": get_all(label="default=False type=label black"),
        "work": get_all(virt_mode="default=True type=str pvh",
                        label="default=False type=label blue")})
    assert qvm_ls.main(["--fields", "name,virt_mode,class"], app=app) == 0
    assert capsys.readouterr().out == ("NAME  VIRT-MODE  CLASS\n"
                                       "dom0  -          AdminVM\n"
                                       "work  pvh        AppVM\n")


def test_power_state_filters(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main(["--halted", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "template1\n"
    assert qvm_ls.main(["--running", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "sys-net\nvm1\n"


def test_class_filter_and_empty_result_prints_header_only(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main(["--class", "TemplateVM", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "template1\n"
    assert qvm_ls.main(["--class", "DispVM"], app=app) == 0
    assert capsys.readouterr().out == "NAME  STATE  CLASS  LABEL  TEMPLATE  NETVM\n"


def test_tags_filter(app, conn, capsys):
    setup_three(conn)
    conn.expected_calls[("vm1", "admin.vm.tag.List", None, b"")] = b"0\x00mine\n"
    conn.expected_calls[("sys-net", "admin.vm.tag.List", None, b"")] = b"0\x00"
    conn.expected_calls[("template1", "admin.vm.tag.List", None, b"")] = b"0\x00other\n"
    assert qvm_ls.main(["--tags", "mine", "other", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "template1\nvm1\n"
    assert qvm_ls.main(["--exclude-tags", "mine", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "sys-net\ntemplate1\n"


def test_sort_numeric_column(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list(
        "a class=AppVM state=Running", "b class=AppVM state=Running", "c class=AppVM state=Running")
    conn.expected_calls[BULK] = get_all_of_all({
        name: get_all(maxmem=f"default=True type=int {mem}")
        for name, mem in (("a", "4000"), ("b", "400"), ("c", ""))})
    assert qvm_ls.main(["-O", "name,maxmem", "--sort", "maxmem"], app=app) == 0
    assert capsys.readouterr().out == "NAME  MAXMEM\nc     -\nb     400\na     4000\n"


def test_all_lists_dom0_and_exclude(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list(
        "dom0 class=AdminVM state=Running", "work class=AppVM state=Halted", "vault class=AppVM state=Halted")
    assert qvm_ls.main(["--all", "--exclude", "vault", "--raw-list"], app=app) == 0
    assert capsys.readouterr().out == "dom0\nwork\n"


def test_no_such_domain(app, conn, capsys):
    setup_three(conn)
    assert qvm_ls.main(["nope"], app=app) == 2
    assert capsys.readouterr().err == "qvm-ls: error: no such domain: 'nope'\n"


def test_flags_column(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list(
        "sys-net class=AppVM state=Running", "debian-12 class=TemplateVM state=Halted")
    conn.expected_calls[BULK] = get_all_of_all({
        "debian-12": get_all(updateable="default=True type=bool True",
                             virt_mode="default=True type=str hvm"),
        "sys-net": get_all(provides_network="default=False type=bool True",
                           virt_mode="default=True type=str pvh",
                           autostart="default=False type=bool True")})
    assert qvm_ls.main(["--raw-data", "-O", "name,flags"], app=app) == 0
    assert capsys.readouterr().out == "debian-12|T-U-----\nsys-net|ar-N---A\n"


def test_daemon_not_running_is_one_clear_line(capsys):
    from bulkhead.client import App, Connection
    code = qvm_ls.main([], app=App(Connection("/nonexistent/qubesd.sock")))
    assert code == 1
    assert capsys.readouterr().err == ("qvm-ls: error: cannot connect to the Bulkhead daemon at "
                                       "/nonexistent/qubesd.sock: is `bulkhead daemon` running?\n")


def test_getall_unsupported_falls_back_to_single_gets(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vm.List", None, b"")] = vm_list("work class=AppVM state=Running")
    conn.expected_calls[BULK] = error("ProtocolError", "no such method")
    conn.expected_calls[("work", "admin.vm.property.GetAll", None, b"")] = error(
        "QubesException", "not implemented")
    conn.expected_calls[("work", "admin.vm.property.Get", "label", b"")] = b"0\x00default=False type=label blue"
    assert qvm_ls.main(["--raw-data", "-O", "name,label"], app=app) == 0
    assert capsys.readouterr().out == "work|blue\n"
