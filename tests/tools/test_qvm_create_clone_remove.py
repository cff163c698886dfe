"""qvm-create, qvm-clone, qvm-remove: the exact Admin API calls and payloads."""

from __future__ import annotations

from bulkhead.tools import qvm_clone, qvm_create, qvm_remove
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")
LABELS = ("dom0", "admin.label.List", None, b"")
LABEL_NAMES = b"0\x00red\norange\nyellow\ngreen\ngray\nblue\npurple\nblack\n"


def test_create_appvm_with_template_and_props(app, conn):
    conn.expected_calls[LABELS] = LABEL_NAMES
    conn.expected_calls[("dom0", "admin.vm.Create.AppVM", "debian-12", b"name=new-vm label=red")] = b"0\x00"
    conn.expected_calls[LIST] = vm_list("debian-12 class=TemplateVM state=Halted", "new-vm class=AppVM state=Halted")
    conn.expected_calls[("new-vm", "admin.vm.property.Set", "vcpus", b"2")] = b"0\x00"
    conn.expected_calls[("new-vm", "admin.vm.property.Set", "memory", b"600")] = b"0\x00"
    assert qvm_create.main(["-t", "debian-12", "-l", "red", "--prop", "vcpus=2",
                            "--prop", "memory=600", "new-vm"], app=app) == 0
    conn.assert_all_called()


def test_create_default_template_class_and_pool(app, conn):
    conn.expected_calls[LABELS] = LABEL_NAMES
    conn.expected_calls[("dom0", "admin.vm.CreateInPool.TemplateVM", None,
                         b"name=tpl label=black pool=fast")] = b"0\x00"
    conn.expected_calls[LIST] = vm_list("tpl class=TemplateVM state=Halted")
    assert qvm_create.main(["-C", "TemplateVM", "-P", "fast", "-l", "black", "tpl"], app=app) == 0
    conn.expected_calls[("dom0", "admin.vm.CreateInPool.AppVM", None,
                         b"name=tpl label=black pool:private=big pool:root=fast")] = b"0\x00"
    assert qvm_create.main(["--pool", "root=fast", "--pool", "private=big", "-l", "black", "tpl"],
                           app=app) == 0
    conn.assert_all_called()


def test_create_requires_label_and_name(app, conn, capsys):
    assert qvm_create.main(["new-vm"], app=app) == 2
    assert capsys.readouterr().err == "qvm-create: error: --label option is mandatory\n"
    assert qvm_create.main(["-l", "red"], app=app) == 2
    assert capsys.readouterr().err == "qvm-create: error: VMNAME is mandatory\n"


def test_create_unknown_label(app, conn, capsys):
    conn.expected_calls[LABELS] = b"0\x00red\nblue\n"
    assert qvm_create.main(["-l", "pink", "x"], app=app) == 2
    assert capsys.readouterr().err == "qvm-create: error: no such label: 'pink'; available: red, blue\n"


def test_create_error_from_daemon(app, conn, capsys):
    conn.expected_calls[LABELS] = LABEL_NAMES
    conn.expected_calls[("dom0", "admin.vm.Create.AppVM", None, b"name=work label=red")] = error(
        "QubesValueError", "VM work already exists")
    assert qvm_create.main(["-l", "red", "work"], app=app) == 1
    assert capsys.readouterr().err == "qvm-create: error: cannot create work: VM work already exists\n"


def test_create_property_failure_exit_2(app, conn, capsys):
    conn.expected_calls[LABELS] = LABEL_NAMES
    conn.expected_calls[("dom0", "admin.vm.Create.AppVM", None, b"name=x label=red")] = b"0\x00"
    conn.expected_calls[LIST] = vm_list("x class=AppVM state=Halted")
    conn.expected_calls[("x", "admin.vm.property.Set", "vcpus", b"many")] = error(
        "QubesPropertyValueError", "Invalid value 'many' for property 'vcpus' of 'x'")
    assert qvm_create.main(["-l", "red", "--prop", "vcpus=many", "x"], app=app) == 2
    assert "cannot set property vcpus (but the qube was created)" in capsys.readouterr().err


def test_create_help_classes(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.vmclass.List", None, b"")] = (
        b"0\x00TemplateVM\nAppVM\nAdminVM\nStandaloneVM\nDispVM\n")
    assert qvm_create.main(["--help-classes"], app=app) == 0
    assert capsys.readouterr().out == "AdminVM\nAppVM\nDispVM\nStandaloneVM\nTemplateVM\n"


def volume_info(pool: str, vid: str, save_on_stop: bool) -> bytes:
    return (f"0\x00pool={pool}\nvid={vid}\nsize=1073741824\nusage=0\nrw=True\nsource=\npath=\n"
            f"save_on_stop={save_on_stop}\nsnap_on_start={not save_on_stop}\n"
            f"revisions_to_keep=1\nephemeral=False\nis_outdated=False\n").encode()


def expect_clone(conn, new_cls: str = "AppVM", ignore_private: bool = False) -> None:
    c = conn.expected_calls
    c[LIST] = vm_list("work class=AppVM state=Halted", "copy class=AppVM state=Halted",
                      "debian-12 class=TemplateVM state=Halted")
    c[("work", "admin.vm.property.Get", "template", b"")] = b"0\x00default=False type=vm debian-12"
    c[("work", "admin.vm.property.Get", "label", b"")] = b"0\x00default=False type=label blue"
    c[("work", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\nvolatile\n"
    c[("work", "admin.vm.volume.Info", "root", b"")] = volume_info("default", "appvms/work/root", False)
    c[("work", "admin.vm.volume.Info", "private", b"")] = volume_info("default", "appvms/work/private", True)
    c[("work", "admin.vm.volume.Info", "volatile", b"")] = volume_info("default", "appvms/work/volatile", False)
    c[("dom0", "admin.property.Get", "default_pool_private", b"")] = b"0\x00default=True type=str default"
    c[("dom0", f"admin.vm.Create.{new_cls}", "debian-12", b"name=copy label=blue")] = b"0\x00"
    c[("work", "admin.vm.property.List", None, b"")] = b"0\x00name\nlabel\nnetvm\nvcpus\nmemory\n"
    c[("work", "admin.vm.property.Get", "netvm", b"")] = b"0\x00default=False type=vm "
    c[("work", "admin.vm.property.Get", "vcpus", b"")] = b"0\x00default=False type=int 4"
    c[("work", "admin.vm.property.Get", "memory", b"")] = b"0\x00default=True type=int 400"
    c[("copy", "admin.vm.property.Set", "netvm", b"")] = b"0\x00"
    c[("copy", "admin.vm.property.Set", "vcpus", b"4")] = b"0\x00"
    c[("work", "admin.vm.tag.List", None, b"")] = b"0\x00created-by-dom0\nproject\n"
    c[("copy", "admin.vm.tag.Set", "project", b"")] = b"0\x00"
    c[("work", "admin.vm.feature.List", None, b"")] = b"0\x00gui\n"
    c[("work", "admin.vm.feature.Get", "gui", b"")] = b"0\x001"
    c[("copy", "admin.vm.feature.Set", "gui", b"1")] = b"0\x00"
    c[("copy", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\nvolatile\n"
    c[("copy", "admin.vm.volume.Info", "root", b"")] = volume_info("default", "appvms/copy/root", False)
    c[("copy", "admin.vm.volume.Info", "private", b"")] = volume_info("default", "appvms/copy/private", True)
    c[("copy", "admin.vm.volume.Info", "volatile", b"")] = volume_info("default", "appvms/copy/volatile", False)
    c[("work", "admin.vm.volume.CloneFrom", "private", b"")] = b"0\x00token123"
    c[("copy", "admin.vm.volume.CloneTo", "private", b"token123")] = b"0\x00"


def test_clone_makes_the_calls_qubesadmin_makes(app, conn):
    expect_clone(conn)
    assert qvm_clone.main(["work", "copy"], app=app) == 0
    conn.assert_all_called()
    # the default-valued property, the created-by tag and name/label are not copied
    assert ("copy", "admin.vm.property.Set", "memory", b"400") not in conn.calls
    assert ("copy", "admin.vm.tag.Set", "created-by-dom0", b"") not in conn.calls
    assert not [c for c in conn.calls if c[0] == "copy" and c[2] in ("name", "label")
                and c[1] == "admin.vm.property.Set"]


def test_clone_failure_removes_the_partial_copy(app, conn, capsys):
    expect_clone(conn)
    conn.expected_calls[("copy", "admin.vm.volume.CloneTo", "private", b"token123")] = error(
        "StoragePoolException", "disk full")
    conn.expected_calls[("copy", "admin.vm.Remove", None, b"")] = b"0\x00"
    assert qvm_clone.main(["work", "copy"], app=app) == 1
    assert capsys.readouterr().err == "qvm-clone: error: disk full\n"
    assert ("copy", "admin.vm.Remove", None, b"") in conn.calls


def test_clone_requires_new_name(app, conn, capsys):
    assert qvm_clone.main(["work"], app=app) == 2
    assert "NEWVM" in capsys.readouterr().err


def test_create_standalone_from_template_is_a_clone_of_root(app, conn):
    c = conn.expected_calls
    c[LABELS] = LABEL_NAMES
    c[LIST] = vm_list("debian-12 class=TemplateVM state=Halted", "sa class=StandaloneVM state=Halted")
    c[("debian-12", "admin.vm.property.Get", "template", b"")] = error(
        "QubesNoSuchPropertyError", "Invalid property 'template' of debian-12")
    c[("debian-12", "admin.vm.property.Get", "label", b"")] = b"0\x00default=False type=label black"
    c[("debian-12", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    c[("debian-12", "admin.vm.volume.Info", "root", b"")] = volume_info("default", "vm-templates/debian-12/root", True)
    c[("dom0", "admin.property.Get", "default_pool_root", b"")] = b"0\x00default=True type=str default"
    c[("dom0", "admin.vm.Create.StandaloneVM", None, b"name=sa label=black")] = b"0\x00"
    c[("debian-12", "admin.vm.property.List", None, b"")] = b"0\x00label\n"
    c[("debian-12", "admin.vm.tag.List", None, b"")] = b"0\x00"
    c[("debian-12", "admin.vm.feature.List", None, b"")] = b"0\x00"
    c[("sa", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    c[("sa", "admin.vm.volume.Info", "root", b"")] = volume_info("default", "appvms/sa/root", True)
    c[("debian-12", "admin.vm.volume.CloneFrom", "root", b"")] = b"0\x00tok"
    c[("sa", "admin.vm.volume.CloneTo", "root", b"tok")] = b"0\x00"
    c[("sa", "admin.vm.property.Set", "label", b"green")] = b"0\x00"
    assert qvm_create.main(["--standalone", "-t", "debian-12", "-l", "green", "sa"], app=app) == 0
    conn.assert_all_called()
    assert ("debian-12", "admin.vm.volume.CloneFrom", "private", b"") not in conn.calls


def test_remove_force(app, conn):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Halted", "b class=AppVM state=Halted")
    conn.expected_calls[("a", "admin.vm.Remove", None, b"")] = b"0\x00"
    conn.expected_calls[("b", "admin.vm.Remove", None, b"")] = b"0\x00"
    assert qvm_remove.main(["-f", "a", "b"], app=app) == 0
    conn.assert_all_called()


def test_remove_asks_first(app, conn, capsys, monkeypatch):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Halted")
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert qvm_remove.main(["a"], app=app) == 1
    assert "Remove cancelled." in capsys.readouterr().err
    conn.expected_calls[("a", "admin.vm.Remove", None, b"")] = b"0\x00"
    assert qvm_remove.main(["a"], app=app) == 0
    conn.assert_all_called()


def test_remove_running_qube_fails_cleanly(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Running")
    conn.expected_calls[("a", "admin.vm.Remove", None, b"")] = error(
        "QubesVMNotHaltedError", "Domain is not powered off: 'a'")
    assert qvm_remove.main(["-f", "a"], app=app) == 1
    assert capsys.readouterr().err == "qvm-remove: error: cannot remove a: Domain is not powered off: 'a'\n"


def test_remove_dom0_refused(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running")
    assert qvm_remove.main(["-f", "dom0"], app=app) == 1
    assert capsys.readouterr().err == "qvm-remove: error: Domain 'dom0' cannot be removed.\n"
