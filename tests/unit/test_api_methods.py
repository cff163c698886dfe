"""Each Admin API method: argument rules, body formats, effects."""

from __future__ import annotations

from typing import Any

import pytest

from bulkhead.lifecycle_fake import FakePool
from core_helpers import error, ok


def test_vmclass_and_labels(server: Any) -> None:
    assert ok(server.call("dom0", "admin.vmclass.List")) == \
        "AdminVM\nAppVM\nDispVM\nStandaloneVM\nTemplateVM\n"
    assert ok(server.call("dom0", "admin.label.List")) == \
        "red\norange\nyellow\ngreen\ngray\nblue\npurple\nblack\n"
    assert ok(server.call("dom0", "admin.label.Get", "orange")) == "0xf57900"
    assert ok(server.call("dom0", "admin.label.Index", "purple")) == "7"
    assert ok(server.call("dom0", "admin.label.Get", "8")) == "0x000000"
    assert error(server.call("dom0", "admin.label.Get", "pink"))[0] == "QubesValueError"
    assert error(server.call("work", "admin.label.List"))[0] == "ProtocolError"
    assert error(server.call("dom0", "admin.label.Get"))[0] == "ProtocolError"


def test_create(server: Any) -> None:
    assert server.call("dom0", "admin.vm.Create.AppVM", "debian-12",
                       b"name=mail label=purple") == b"0\0"
    assert ok(server.call("mail", "admin.vm.property.Get", "template")) == \
        "default=False type=vm debian-12"
    assert ok(server.call("mail", "admin.vm.tag.List")) == "created-by-dom0\n"
    assert ok(server.call("mail", "admin.vm.volume.List")) == "root\nprivate\nvolatile\n"
    assert server.call("dom0", "admin.vm.Create.StandaloneVM", None,
                       b"name=win label=green") == b"0\0"
    assert server.call("dom0", "admin.vm.Create.DispVM", "default-dvm",
                       b"name=disp1 label=red") == b"0\0"
    assert ok(server.call("disp1", "admin.vm.List")) == "disp1 class=DispVM state=Halted\n"
    cases = [
        ("AppVM", None, b"name=mail label=red", "QubesValueError"),        # exists
        ("AppVM", None, b"name=x label=pink", "QubesValueError"),          # no such label
        ("AppVM", None, b"name=x label=1", "ProtocolError"),               # index, not name
        ("AppVM", None, b"name=x", "ProtocolError"),                       # label missing
        ("AppVM", None, b"name=x label=red color=1", "ProtocolError"),     # unknown param
        ("AppVM", None, b"name=x label=red pool=default", "ProtocolError"),  # not InPool
        ("AppVM", None, b"name=x name=y label=red", "ProtocolError"),
        ("AppVM", None, b"nameequalsx", "ProtocolError"),
        ("AppVM", None, b"name=1x label=red", "QubesValueError"),
        ("AppVM", None, b"name=dom0 label=red", "QubesValueError"),
        ("AppVM", "nope", b"name=x label=red", "QubesVMNotFoundError"),
        ("AppVM", "work", b"name=x label=red", "QubesPropertyValueError"),  # not a template
        ("TemplateVM", "debian-12", b"name=x label=red", "QubesValueError"),
        ("DispVM", "work", b"name=x label=red", "QubesPropertyValueError"),
        ("AppVM", None, b"", "ProtocolError"),                             # payload required
        ("AppVM", None, b"name=\xff label=red", "ProtocolError"),
    ]
    for klass, template, payload, expected in cases:
        reply = server.call("dom0", f"admin.vm.Create.{klass}", template, payload)
        assert error(reply)[0] == expected, (payload, reply)
    assert error(server.call("dom0", "admin.vm.Create.AdminVM", None,
                             b"name=x label=red"))[0] == "ProtocolError"
    assert error(server.call("work", "admin.vm.Create.AppVM", None,
                             b"name=x label=red"))[0] == "ProtocolError"  # dest must be dom0
    assert b"\nx class" not in server.call("dom0", "admin.vm.List")


def test_create_in_pool(server: Any) -> None:
    server.app.pools.inject(FakePool("fast", revisions_to_keep=2))
    assert server.call("dom0", "admin.vm.CreateInPool.AppVM", None,
                       b"name=p1 label=red pool=fast") == b"0\0"
    assert "pool=fast\n" in ok(server.call("p1", "admin.vm.volume.Info", "private"))
    assert server.call("dom0", "admin.vm.CreateInPool.AppVM", None,
                       b"name=p2 label=red pool:private=fast") == b"0\0"
    assert "pool=default\n" in ok(server.call("p2", "admin.vm.volume.Info", "root"))
    assert "pool=fast\n" in ok(server.call("p2", "admin.vm.volume.Info", "private"))
    for payload, expected in ((b"name=p3 label=red pool=nope", "QubesPoolNotFoundError"),
                              (b"name=p3 label=red pool:swap=fast", "ProtocolError"),
                              (b"name=p3 label=red pool=fast pool:root=fast", "ProtocolError")):
        assert error(server.call("dom0", "admin.vm.CreateInPool.AppVM", None,
                                 payload))[0] == expected


def test_remove(server: Any) -> None:
    assert error(server.call("debian-12", "admin.vm.Remove"))[0] == "QubesVMInUseError"
    assert error(server.call("sys-firewall", "admin.vm.Remove"))[0] == "QubesVMInUseError"
    assert error(server.call("dom0", "admin.vm.Remove"))[0] == "QubesVMInUseError"
    assert server.call("vault", "admin.vm.Start") == b"0\0"
    assert error(server.call("vault", "admin.vm.Remove"))[0] == "QubesVMNotHaltedError"
    assert server.call("vault", "admin.vm.Kill") == b"0\0"
    assert server.call("vault", "admin.vm.Remove") == b"0\0"
    assert error(server.call("vault", "admin.vm.List"))[0] == "QubesVMNotFoundError"
    assert ("remove_volumes", "vault") in server.app.lifecycle.calls


def test_power_methods(server: Any) -> None:
    assert ok(server.call("work", "admin.vm.CurrentState")) == \
        "mem=0 mem_static_max=4096000 cputime=0 power_state=Halted"
    assert server.call("work", "admin.vm.Start") == b"0\0"
    assert ok(server.call("work", "admin.vm.CurrentState")) == \
        "mem=409600 mem_static_max=4096000 cputime=0 power_state=Running"
    assert server.call("work", "admin.vm.Pause") == b"0\0"
    assert "power_state=Paused" in ok(server.call("work", "admin.vm.CurrentState"))
    assert error(server.call("work", "admin.vm.Pause"))[0] == "QubesVMNotRunningError"
    assert server.call("work", "admin.vm.Unpause") == b"0\0"
    assert error(server.call("work", "admin.vm.Unpause"))[0] == "QubesVMNotPausedError"
    assert error(server.call("sys-firewall", "admin.vm.Shutdown"))[0] == "QubesVMInUseError"
    assert error(server.call("work", "admin.vm.Shutdown", "now"))[0] == "ProtocolError"
    assert server.call("sys-firewall", "admin.vm.Shutdown", "force+wait") == b"0\0"
    assert server.call("work", "admin.vm.Shutdown", "wait") == b"0\0"
    assert error(server.call("work", "admin.vm.Shutdown"))[0] == "QubesVMNotStartedError"
    assert error(server.call("work", "admin.vm.Kill"))[0] == "QubesVMNotStartedError"
    assert error(server.call("work", "admin.vm.Start", "x"))[0] == "ProtocolError"
    assert error(server.call("dom0", "admin.vm.Start"))[0] == "QubesVMError"
    assert ok(server.call("dom0", "admin.vm.CurrentState")).endswith("power_state=Running")


def test_property_methods(server: Any) -> None:
    names = ok(server.call("work", "admin.vm.property.List")).splitlines()
    assert names == sorted(names)
    for expected in ("autostart", "debug", "default_dispvm", "default_user", "icon",
                     "include_in_backups", "installed_by_rpm", "kernel", "kernelopts", "klass",
                     "label", "maxmem", "memory", "name", "netvm", "provides_network", "qid",
                     "qrexec_timeout", "shutdown_timeout", "template", "template_for_dispvms",
                     "updateable", "uuid", "vcpus", "virt_mode"):
        assert expected in names
    assert "template" not in ok(server.call("debian-12", "admin.vm.property.List"))
    assert server.call("work", "admin.vm.property.Set", "kernelopts", b"a\\b") == b"0\0"
    everything = ok(server.call("work", "admin.vm.property.GetAll")).splitlines()
    assert "kernelopts default=False type=str a\\\\b" in everything
    assert "memory default=True type=int 400" in everything
    assert "netvm default=True type=vm sys-firewall" in everything
    assert [line.split(" ")[0] for line in everything] == names
    assert "network" in ok(server.call("work", "admin.vm.property.Help", "netvm"))
    assert server.call("work", "admin.vm.property.Set", "label", b"red") == b"0\0"
    assert server.call("work", "admin.vm.property.Set", "autostart", b"True") == b"0\0"
    assert server.call("work", "admin.vm.property.Set", "template", b"debian-12") == b"0\0"
    for prop, value, expected in (
            ("name", b"other", "QubesPropertyValueError"),
            ("qid", b"12", "QubesPropertyValueError"),
            ("klass", b"TemplateVM", "QubesPropertyValueError"),
            ("memory", b"-5", "QubesPropertyValueError"),
            ("vcpus", b"", "QubesPropertyValueError"),
            ("autostart", b"perhaps", "QubesPropertyValueError"),
            ("label", b"pink", "QubesLabelNotFoundError"),
            ("netvm", b"nope", "QubesVMNotFoundError"),
            ("netvm", b"work", "QubesPropertyValueError"),
            ("template", b"work", "QubesPropertyValueError"),
            ("kernelopts", b"\xc3\xa9", "QubesPropertyValueError"),
            ("kernelopts", b"a\nb", "QubesPropertyValueError"),
            ("nope", b"1", "QubesNoSuchPropertyError")):
        reply = server.call("work", "admin.vm.property.Set", prop, value)
        assert error(reply)[0] == expected, (prop, value, reply)
    assert error(server.call("work", "admin.vm.property.Reset", "template"))[0] == \
        "QubesPropertyValueError"  # no default to reset to
    assert error(server.call("work", "admin.vm.property.Get"))[0] == "ProtocolError"
    assert error(server.call("work", "admin.vm.property.List", "x"))[0] == "ProtocolError"
    assert error(server.call("work", "admin.vm.property.Get", "memory", b"x"))[0] == \
        "ProtocolError"  # unexpected payload


def test_get_all_of_all(server: Any) -> None:
    """bulkhead.vm.property.GetAllOfAll: every qube's GetAll, each line prefixed with the
    qube's name, qubes in admin.vm.List's order."""

    async def prepare() -> None:
        work = server.app.domains["work"]
        # as loaded from a store, unchecked: GetAll escapes what a line cannot hold
        work.load_property("kernelopts", "one\ntwo\\three")
        # a property with no value (no default, never set)
        del server.app.domains["vault"]._property_values["label"]

    server.run(prepare())
    reply = server.call("dom0", "bulkhead.vm.property.GetAllOfAll")
    assert reply.startswith(b"0\0debian-12 autostart default=True type=bool False\n"
                            b"debian-12 debug default=True type=bool False\n")
    body = ok(reply)
    assert "work kernelopts default=False type=str one\\ntwo\\\\three\n" in body
    assert "\nvault label default=True type=label \n" in body
    assert "\nvault netvm default=False type=vm \n" in body  # None
    assert "\ndom0 qid default=False type=int 0\n" in body
    names = [line.split(" ")[0] for line in ok(server.call("dom0", "admin.vm.List")).splitlines()]
    assert "dom0" in names and len(names) == 7
    assert body == "".join(f"{name} {line}\n" for name in names
                           for line in ok(server.call(name, "admin.vm.property.GetAll")).split("\n")
                           if line)
    assert ok(server.call("vault", "admin.vm.property.Get", "label")) == "default=True type=label "
    # on dom0, without argument or payload
    assert error(server.call("work", "bulkhead.vm.property.GetAllOfAll"))[0] == "ProtocolError"
    assert error(server.call("dom0", "bulkhead.vm.property.GetAllOfAll", "x"))[0] == \
        "ProtocolError"
    assert error(server.call("dom0", "bulkhead.vm.property.GetAllOfAll", None, b"x"))[0] == \
        "ProtocolError"


def test_global_property_methods(server: Any) -> None:
    names = ok(server.call("dom0", "admin.property.List")).splitlines()
    for expected in ("clockvm", "default_dispvm", "default_kernel", "default_netvm",
                     "default_pool", "default_qrexec_timeout", "default_shutdown_timeout",
                     "default_template", "updatevm"):
        assert expected in names
    assert server.call("dom0", "admin.property.Set", "updatevm", b"sys-firewall") == b"0\0"
    assert ok(server.call("dom0", "admin.property.Get", "updatevm")) == \
        "default=False type=vm sys-firewall"
    assert server.call("dom0", "admin.property.Reset", "updatevm") == b"0\0"
    assert ok(server.call("dom0", "admin.property.GetDefault", "default_pool")) == \
        "type=str default"
    assert "default_template default=False type=vm debian-12" in \
        ok(server.call("dom0", "admin.property.GetAll")).splitlines()
    assert ok(server.call("dom0", "admin.property.Help", "default_netvm"))
    assert error(server.call("dom0", "admin.property.Set", "default_template",
                             b"work"))[0] == "QubesPropertyValueError"
    assert error(server.call("work", "admin.property.Get", "default_netvm"))[0] == \
        "ProtocolError"  # global properties live on dom0
    # dom0's own (qube) properties
    assert ok(server.call("dom0", "admin.vm.property.Get", "qid")) == "default=False type=int 0"


def test_features(server: Any) -> None:
    assert ok(server.call("work", "admin.vm.feature.List")) == ""
    assert server.call("debian-12", "admin.vm.feature.Set", "os", b"Linux") == b"0\0"
    assert server.call("dom0", "admin.vm.feature.Set", "gui-default", b"1") == b"0\0"
    assert server.call("work", "admin.vm.feature.Set", "service.cups", b"") == b"0\0"
    assert ok(server.call("work", "admin.vm.feature.List")) == "service.cups\n"
    assert ok(server.call("work", "admin.vm.feature.Get", "service.cups")) == ""
    assert ok(server.call("work", "admin.vm.feature.CheckWithTemplate", "os")) == "Linux"
    assert ok(server.call("work", "admin.vm.feature.CheckWithTemplateAndAdminVM",
                          "gui-default")) == "1"
    assert error(server.call("work", "admin.vm.feature.CheckWithTemplate", "gui-default"))[0] \
        == "QubesFeatureNotFoundError"
    assert error(server.call("work", "admin.vm.feature.Get", "os")) == \
        ("QubesFeatureNotFoundError", "Feature not set for domain work: os")
    assert server.call("work", "admin.vm.feature.Remove", "service.cups") == b"0\0"
    assert error(server.call("work", "admin.vm.feature.Remove", "service.cups"))[0] == \
        "QubesFeatureNotFoundError"
    assert error(server.call("work", "admin.vm.feature.Set", "x", b"\xff"))[0] == \
        "QubesValueError"
    assert error(server.call("work", "admin.vm.feature.Set", "x", b"a\0b"))[0] == \
        "QubesValueError"


def test_tags(server: Any) -> None:
    assert ok(server.call("work", "admin.vm.tag.List")) == "created-by-dom0\n"
    assert ok(server.call("work", "admin.vm.tag.Get", "audited")) == "0"
    assert server.call("work", "admin.vm.tag.Set", "audited") == b"0\0"
    assert ok(server.call("work", "admin.vm.tag.Get", "audited")) == "1"
    assert ok(server.call("work", "admin.vm.tag.List")) == "audited\ncreated-by-dom0\n"
    assert server.call("work", "admin.vm.tag.Remove", "audited") == b"0\0"
    assert error(server.call("work", "admin.vm.tag.Remove", "audited"))[0] == \
        "QubesTagNotFoundError"
    assert error(server.call("work", "admin.vm.tag.Set", "a.b"))[0] == "QubesValueError"


def test_pools(server: Any) -> None:
    assert ok(server.call("dom0", "admin.pool.List")) == "default\n"
    assert ok(server.call("dom0", "admin.pool.ListDrivers")) == \
        "file dir_path name revisions_to_keep\nfile-reflink dir_path name revisions_to_keep\n" \
        "linux-kernel dir_path name\n"
    info = ok(server.call("dom0", "admin.pool.Info", "default")).splitlines()
    assert "driver=file" in info and "name=default" in info
    assert error(server.call("dom0", "admin.pool.Info", "nope"))[0] == "QubesPoolNotFoundError"


def test_volumes(server: Any) -> None:
    info = ok(server.call("work", "admin.vm.volume.Info", "root")).splitlines()
    assert [line.split("=")[0] for line in info] == [
        "pool", "vid", "size", "usage", "rw", "source", "path", "save_on_stop",
        "snap_on_start", "revisions_to_keep", "ephemeral", "is_outdated"]
    assert "vid=appvms/work/root" in info and "snap_on_start=True" in info
    assert "source=default:vm-templates/debian-12/root" in info
    assert ok(server.call("dom0", "admin.vm.volume.List")) == ""
    assert error(server.call("work", "admin.vm.volume.Info", "swap"))[0] == \
        "QubesVolumeNotFoundError"

    async def revisions() -> None:
        volume = server.app.lifecycle.volume(server.app.domains["work"], "private")
        volume.config.revisions_to_keep = 2
        for content in ("v1", "v2"):
            volume.content = content
            await volume.start()
            await volume.stop()
        volume.content = "v3"

    server.run(revisions())
    revs = ok(server.call("work", "admin.vm.volume.ListSnapshots", "private")).splitlines()
    assert len(revs) == 2
    assert error(server.call("work", "admin.vm.volume.Revert", "private", b"999"))[0] == \
        "QubesVolumeRevisionNotFoundError"
    assert server.call("work", "admin.vm.volume.Revert", "private", revs[0].encode()) == b"0\0"
    volume = server.app.lifecycle.volume(server.app.domains["work"], "private")
    assert volume.content == "v1"

    size = 3 * 1024 ** 3
    assert server.call("work", "admin.vm.volume.Resize", "private", str(size).encode()) == b"0\0"
    assert f"size={size}" in ok(server.call("work", "admin.vm.volume.Info", "private"))
    assert server.app.domains["work"].volume_config["private"].size == size
    assert error(server.call("work", "admin.vm.volume.Resize", "private", b"1024"))[0] == \
        "StoragePoolException"
    for bad in (b"12abc", b"-5", b"0012", b"9" * 25):
        assert error(server.call("work", "admin.vm.volume.Resize", "private", bad))[0] == \
            "ProtocolError"

    token = ok(server.call("work", "admin.vm.volume.CloneFrom", "private"))
    assert len(token) == 32
    assert server.call("vault", "admin.vm.volume.CloneTo", "private", token.encode()) == b"0\0"
    assert server.app.lifecycle.volume(server.app.domains["vault"], "private").content == "v1"
    assert error(server.call("vault", "admin.vm.volume.CloneTo", "private",
                             token.encode()))[0] == "ProtocolError"  # a token is used once
    server.call("vault", "admin.vm.Start")
    token = ok(server.call("work", "admin.vm.volume.CloneFrom", "private"))
    assert error(server.call("vault", "admin.vm.volume.CloneTo", "private",
                             token.encode()))[0] == "QubesVMNotHaltedError"


@pytest.mark.parametrize("method,dest,arg", [
    ("admin.vmclass.List", "work", None), ("admin.pool.List", "work", None),
    ("admin.vm.List", "dom0", "x"), ("admin.vm.tag.List", "work", "x"),
    ("admin.vm.feature.Get", "work", None), ("admin.Events", "dom0", "x"),
])
def test_argument_and_destination_rules(server: Any, method: str, dest: str,
                                        arg: str | None) -> None:
    assert error(server.call(dest, method, arg))[0] == "ProtocolError"


def test_only_dom0_may_call(server: Any) -> None:
    from core_helpers import raw_call
    reply = raw_call(server.socket, b"admin.vm.List+ work name dom0\0")
    assert error(reply)[0] == "PermissionDenied"
