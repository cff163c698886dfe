"""The client library itself: typed properties, collections, features, tags, volumes."""

from __future__ import annotations

import pytest

from bulkhead import errors
from bulkhead.client import DEFAULT, VM, Label
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")


def test_typed_property_values(app, conn):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Running", "sys-firewall class=AppVM state=Running")
    c = conn.expected_calls
    c[("work", "admin.vm.property.Get", "netvm", b"")] = b"0\x00default=True type=vm sys-firewall"
    c[("work", "admin.vm.property.Get", "label", b"")] = b"0\x00default=False type=label blue"
    c[("work", "admin.vm.property.Get", "vcpus", b"")] = b"0\x00default=True type=int 2"
    c[("work", "admin.vm.property.Get", "debug", b"")] = b"0\x00default=True type=bool False"
    c[("work", "admin.vm.property.Get", "kernelopts", b"")] = b"0\x00default=True type=str a b  c"
    c[("work", "admin.vm.property.Get", "template", b"")] = b"0\x00default=True type=vm "
    c[("work", "admin.vm.property.Get", "memory", b"")] = b"0\x00default=True type=int "
    work = app.domains["work"]
    assert isinstance(work.netvm, VM) and work.netvm.name == "sys-firewall"
    assert work.netvm.klass == "AppVM"  # from the listing, no extra call
    assert isinstance(work.label, Label) and str(work.label) == "blue"
    assert work.vcpus == 2 and work.debug is False
    assert work.kernelopts == "a b  c"  # spaces in a value survive
    assert work.template is None
    with pytest.raises(AttributeError):
        work.memory  # noqa: B018 - exists, but has no value
    assert work.property_is_default("netvm") is True


BULK = ("dom0", "bulkhead.vm.property.GetAllOfAll", None, b"")
BULK_REPLY = (b"0\x00sys-firewall label default=False type=label green\n"
              b"sys-firewall provides_network default=False type=bool True\n"
              b"work kernelopts default=False type=str a\\nb\\\\c\n"
              b"work label default=False type=label blue\n"
              b"work memory default=True type=int \n"
              b"work netvm default=True type=vm sys-firewall\n")


def test_cache_prefetches_every_qube_in_one_call(app, conn):
    conn.expected_calls[LIST] = vm_list("sys-firewall class=AppVM state=Running",
                                        "work class=AppVM state=Halted")
    conn.expected_calls[BULK] = BULK_REPLY
    app.cache_enabled = True
    work, firewall = app.domains["work"], app.domains["sys-firewall"]
    assert work.kernelopts == "a\nb\\c"  # unescaped
    assert str(work.label) == "blue" and work.netvm is firewall
    assert work.property_is_default("netvm") and not work.property_is_default("label")
    with pytest.raises(AttributeError):
        work.memory  # noqa: B018 - exists, but has no value
    assert work.property_list() == ["kernelopts", "label", "memory", "netvm"]
    assert firewall.provides_network is True and str(firewall.label) == "green"
    assert work.get_power_state() == "Halted"  # from the listing
    with pytest.raises(errors.QubesNoSuchPropertyError):
        firewall.get_property("template")  # not in its GetAll: no Get
    assert conn.calls == [LIST, BULK]


def test_a_change_drops_what_was_prefetched(app, conn):
    conn.expected_calls[LIST] = vm_list("sys-firewall class=AppVM state=Running",
                                        "work class=AppVM state=Halted")
    conn.expected_calls[BULK] = [BULK_REPLY, BULK_REPLY.replace(b"type=label blue",
                                                                b"type=label red")]
    conn.expected_calls[("work", "admin.vm.property.Set", "label", b"red")] = b"0\x00"
    app.cache_enabled = True
    assert app.domains["sys-firewall"].provides_network is True
    app.domains["work"].label = "red"
    assert str(app.domains["work"].label) == "red"
    assert conn.calls == [LIST, BULK, ("work", "admin.vm.property.Set", "label", b"red"), BULK]


def test_without_cache_no_bulk_call(app, conn):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[("work", "admin.vm.property.Get", "label", b"")] = (
        b"0\x00default=False type=label blue")
    assert str(app.domains["work"].label) == "blue"
    assert conn.calls == [LIST, ("work", "admin.vm.property.Get", "label", b"")]


def test_no_such_property_is_attribute_error(app, conn):
    conn.expected_calls[("work", "admin.vm.property.Get", "nope", b"")] = error(
        "QubesNoSuchPropertyError", "Invalid property 'nope' of work")
    work = app.domains.get_blind("work")
    assert getattr(work, "nope", "fallback") == "fallback"
    with pytest.raises(errors.QubesNoSuchPropertyError):
        work.get_property("nope")


def test_set_and_reset_by_attribute(app, conn):
    c = conn.expected_calls
    c[("work", "admin.vm.property.Set", "netvm", b"sys-net")] = b"0\x00"
    c[("work", "admin.vm.property.Set", "template", b"")] = b"0\x00"
    c[("work", "admin.vm.property.Set", "autostart", b"True")] = b"0\x00"
    c[("work", "admin.vm.property.Set", "vcpus", b"3")] = b"0\x00"
    c[("work", "admin.vm.property.Reset", "memory", b"")] = b"0\x00"
    c[("work", "admin.vm.property.Reset", "kernel", b"")] = b"0\x00"
    work = app.domains.get_blind("work")
    work.netvm = app.domains.get_blind("sys-net")
    work.template = None
    work.autostart = True
    work.vcpus = 3
    del work.memory
    work.kernel = DEFAULT
    conn.assert_all_called()


def test_global_properties(app, conn):
    conn.expected_calls[("dom0", "admin.property.Get", "default_netvm", b"")] = (
        b"0\x00default=False type=vm sys-firewall")
    conn.expected_calls[("dom0", "admin.property.Set", "default_netvm", b"sys-net")] = b"0\x00"
    assert app.default_netvm.name == "sys-firewall"
    app.default_netvm = "sys-net"
    conn.assert_all_called()


def test_domains_collection(app, conn):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running",
                                        "work class=AppVM state=Halted uuid=1234")
    assert "work" in app.domains and "nope" not in app.domains
    assert [vm.name for vm in app.domains] == ["dom0", "work"]
    assert app.domains["work"] is app.domains["work"]
    with pytest.raises(KeyError):
        app.domains["nope"]
    with pytest.raises(errors.QubesVMNotFoundError):
        app.domains.require("nope")
    # one listing serves all of the above
    assert conn.calls.count(LIST) == 1


def test_power_state_and_predicates(app, conn):
    conn.expected_calls[("work", "admin.vm.CurrentState", None, b"")] = [
        b"0\x00mem=1 mem_static_max=2 cputime=3 power_state=Paused",
        b"0\x00mem=1 mem_static_max=2 cputime=3 power_state=Paused", b"0\x00power_state=Halted"]
    work = app.domains.get_blind("work")
    assert work.is_paused() and work.is_running()
    assert work.is_halted() and not work.is_running()


def test_shutdown_arguments(app, conn):
    for arg in (None, "force", "wait", "force+wait"):
        conn.expected_calls[("work", "admin.vm.Shutdown", arg, b"")] = b"0\x00"
    work = app.domains.get_blind("work")
    work.shutdown()
    work.shutdown(force=True)
    work.shutdown(wait=True)
    work.shutdown(force=True, wait=True)
    conn.assert_all_called()


def test_labels(app, conn):
    conn.expected_calls[("dom0", "admin.label.List", None, b"")] = b"0\x00red\nblue\n"
    conn.expected_calls[("dom0", "admin.label.Get", "blue", b"")] = b"0\x000x3384d6"
    conn.expected_calls[("dom0", "admin.label.Index", "red", b"")] = b"0\x001"
    conn.expected_calls[("dom0", "admin.label.Index", "blue", b"")] = b"0\x006"
    assert list(app.labels) == ["red", "blue"]
    assert app.labels["blue"].color == "0x3384d6"
    assert app.get_label("6").name == "blue"
    with pytest.raises(KeyError):
        app.get_label("pink")


def test_features_and_tags(app, conn):
    c = conn.expected_calls
    c[("work", "admin.vm.feature.Get", "gui", b"")] = b"0\x001"
    c[("work", "admin.vm.feature.Get", "nope", b"")] = error("QubesFeatureNotFoundError", "Feature not set")
    c[("work", "admin.vm.feature.Set", "on", b"1")] = b"0\x00"
    c[("work", "admin.vm.feature.Set", "off", b"")] = b"0\x00"
    c[("work", "admin.vm.feature.CheckWithTemplate", "os", b"")] = b"0\x00Linux"
    c[("work", "admin.vm.tag.Get", "t", b"")] = b"0\x001"
    c[("work", "admin.vm.tag.Get", "u", b"")] = b"0\x000"
    work = app.domains.get_blind("work")
    assert work.features["gui"] == "1"
    assert "nope" not in work.features and work.features.get("nope", "x") == "x"
    with pytest.raises(KeyError):
        work.features["nope"]
    work.features["on"] = True
    work.features["off"] = False
    assert work.features.check_with_template("os") == "Linux"
    assert "t" in work.tags and "u" not in work.tags


def test_volume_info_and_operations(app, conn):
    c = conn.expected_calls
    c[("work", "admin.vm.volume.List", None, b"")] = b"0\x00private\n"
    c[("work", "admin.vm.volume.Info", "private", b"")] = (
        b"0\x00pool=default\nvid=appvms/work/private\nsize=2147483648\nusage=100\nrw=True\n"
        b"source=\nsave_on_stop=True\nsnap_on_start=False\nrevisions_to_keep=2\nis_outdated=False\n")
    c[("work", "admin.vm.volume.Resize", "private", b"4294967296")] = b"0\x00"
    work = app.domains.get_blind("work")
    vol = work.volumes["private"]
    assert (vol.pool, vol.vid, vol.size, vol.usage) == ("default", "appvms/work/private", 2147483648, 100)
    assert vol.rw and vol.save_on_stop and not vol.snap_on_start and vol.source is None
    vol.resize(4 << 30)
    conn.assert_all_called()


def test_add_new_vm_payloads(app, conn):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Halted", "t class=TemplateVM state=Halted")
    conn.expected_calls[("dom0", "admin.vm.Create.AppVM", "t", b"name=a label=red")] = b"0\x00"
    conn.expected_calls[("dom0", "admin.vm.CreateInPool.TemplateVM", None,
                         b"name=t label=black pool=p")] = b"0\x00"
    assert app.add_new_vm("AppVM", "a", "red", template="t").name == "a"
    assert app.add_new_vm("TemplateVM", "t", "black", pool="p").klass == "TemplateVM"
    with pytest.raises(ValueError):
        app.add_new_vm("AppVM", "a", "red", pool="p", pools={"root": "q"})
