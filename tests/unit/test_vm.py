from __future__ import annotations

from typing import Any

import pytest

from bulkhead.errors import (QubesFeatureNotFoundError, QubesNoSuchPropertyError,
                             QubesPoolNotFoundError, QubesPropertyValueError,
                             QubesTagNotFoundError, QubesValueError, QubesVMInUseError,
                             QubesVMNotFoundError, QubesVMNotHaltedError)
from bulkhead.labels import LABELS, get_label
from bulkhead.lifecycle_fake import FakePool
from bulkhead.vm import validate_name
from bulkhead.vm.volumes import GiB


@pytest.mark.parametrize("name", ["work", "a", "sys-net", "debian-12", "A_b.c-d",
                                  "x" * 31])
def test_valid_names(name: str) -> None:
    assert validate_name(None, None, name) == name


@pytest.mark.parametrize("name,why", [
    ("", "start with a letter"), ("1abc", "start with a letter"), ("-a", "start with a letter"),
    ("x" * 32, "shorter than 32"), ("a b", "illegal characters"), ("a/b", "illegal"),
    ("é", "start with a letter"), ("none", "reserved"), ("default", "reserved"),
    ("dom0", "reserved"), ("work-dm", "-dm"), (".", "start with a letter"),
    ("..", "start with a letter"),
])
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(QubesValueError, match=why):
        validate_name(None, None, name)


def test_labels_are_qubes_labels() -> None:
    assert [(l.name, l.index, l.color) for l in LABELS] == [
        ("red", 1, "0xcc0000"), ("orange", 2, "0xf57900"), ("yellow", 3, "0xedd400"),
        ("green", 4, "0x73d216"), ("gray", 5, "0x555753"), ("blue", 6, "0x3465a4"),
        ("purple", 7, "0x75507b"), ("black", 8, "0x000000")]
    assert get_label("3").name == "yellow" and get_label(8).name == "black"
    assert get_label("blue").rgb == (0x34, 0x65, 0xa4)


def test_dom0(app: Any) -> None:
    dom0 = app.domains["dom0"]
    assert dom0.qid == 0 and dom0.klass == "AdminVM" and dom0.get_power_state() == "Running"
    assert dom0.volume_config == {} and app.domains[0] is dom0
    assert dom0.label.name == "black"


def test_standard_defaults(system: Any) -> None:
    app = system
    work = app.domains["work"]
    t = app.domains["debian-12"]
    assert work.template is t and not work.property_is_default("template")
    assert work.netvm is app.domains["sys-firewall"] and work.property_is_default("netvm")
    assert app.domains["sys-firewall"].netvm is app.domains["sys-net"]
    assert app.domains["vault"].netvm is None
    assert t.netvm is None  # templates: no network by default
    assert work.memory == 400 and work.vcpus == 2 and work.virt_mode == "pvh"
    assert work.maxmem == 4000 and work.qrexec_timeout == 60 and work.shutdown_timeout == 60
    assert work.default_user == "user" and work.kernel == "" and work.kernelopts == ""
    assert work.default_dispvm is app.domains["default-dvm"]
    assert work.include_in_backups and not work.autostart and not work.debug
    assert work.klass == "AppVM" and work.icon == "appvm-blue" and not work.updateable
    assert t.updateable and t.icon == "templatevm-black"
    assert app.domains["sys-net"].icon == "servicevm-red"
    assert "created-by-dom0" in work.tags
    # AppVM settings follow the template's unless set
    t.memory = 800
    t.vcpus = 4
    assert work.memory == 800 and work.vcpus == 4 and work.property_is_default("memory")
    work.memory = 300
    assert work.memory == 300 and t.memory == 800
    app.default_qrexec_timeout = 90
    assert work.qrexec_timeout == 90


def test_qids_and_uuids(system: Any) -> None:
    qids = [vm.qid for vm in system.domains]
    assert len(set(qids)) == len(qids) and 0 in qids
    work = system.domains["work"]
    assert system.domains[f"uuid:{work.uuid}"] is work
    for prop, value in (("qid", 99), ("uuid", "00000000-0000-0000-0000-000000000001"),
                        ("name", "other")):
        with pytest.raises(QubesPropertyValueError, match="write-once"):
            setattr(work, prop, value)


def test_volume_configs(system: Any) -> None:
    t = system.domains["debian-12"]
    work = system.domains["work"]
    root, private, volatile = (t.volume_config[n] for n in ("root", "private", "volatile"))
    assert (root.size, root.save_on_stop, root.rw, root.snap_on_start) == (10 * GiB, True, True,
                                                                           False)
    assert (private.size, private.save_on_stop, private.revisions_to_keep) == (2 * GiB, True, 1)
    assert (volatile.size, volatile.ephemeral, volatile.rw) == (10 * GiB, True, True)
    assert t.volume_vid("root") == "vm-templates/debian-12/root"
    assert work.volume_vid("private") == "appvms/work/private"
    wroot = work.volume_config["root"]
    assert wroot.snap_on_start and not wroot.save_on_stop
    assert wroot.source == "default:vm-templates/debian-12/root"
    assert work.volume_config["private"].save_on_stop
    assert list(work.volume_config) == ["root", "private", "volatile"]


def test_dispvm_volumes_and_properties(system: Any, arun: Any) -> None:
    dvm = system.domains["default-dvm"]
    disp = arun(system.create_vm("DispVM", name="disp1", label="red"))
    assert disp.template is dvm
    assert disp.volume_config["root"].source == "default:vm-templates/debian-12/root"
    assert disp.volume_config["private"].source == "default:appvms/default-dvm/private"
    assert disp.volume_config["private"].snap_on_start
    assert disp.netvm is dvm.netvm and disp.label.name == "red"
    assert disp.memory == dvm.memory and disp.icon == "dispvm-red"
    with pytest.raises(QubesPropertyValueError, match="DispVMs based on"):
        dvm.template_for_dispvms = False
    with pytest.raises(QubesPropertyValueError, match="not a disposable template"):
        arun(system.create_vm("DispVM", name="disp2", label="red",
                              template=system.domains["work"]))


def test_create_in_pools(system: Any, arun: Any) -> None:
    system.pools.inject(FakePool("fast", revisions_to_keep=3))
    vm = arun(system.create_vm("StandaloneVM", name="sa", label="purple", pool="fast"))
    assert {c.pool for c in vm.volume_config.values()} == {"fast"}
    assert vm.volume_config["private"].revisions_to_keep == 3
    vm2 = arun(system.create_vm("AppVM", name="mixed", label="purple",
                                pools={"private": "fast"}))
    assert vm2.volume_config["private"].pool == "fast"
    assert vm2.volume_config["root"].pool == "default"
    system.default_pool_private = "fast"
    vm3 = arun(system.create_vm("AppVM", name="third", label="gray"))
    assert vm3.volume_config["private"].pool == "fast"
    with pytest.raises(QubesPoolNotFoundError):
        arun(system.create_vm("AppVM", name="nopool", label="gray", pool="missing"))
    with pytest.raises(QubesPropertyValueError):
        system.default_pool = "missing"
    assert "nopool" not in system.domains


def test_create_errors(system: Any, arun: Any) -> None:
    with pytest.raises(QubesValueError, match="already exists"):
        arun(system.create_vm("AppVM", name="work", label="red"))
    with pytest.raises(QubesValueError, match="cannot be based on template"):
        arun(system.create_vm("TemplateVM", name="t2", label="red",
                              template=system.domains["debian-12"]))
    with pytest.raises(QubesPropertyValueError, match="TemplateVM"):
        arun(system.create_vm("AppVM", name="bad", label="red",
                              template=system.domains["work"]))
    with pytest.raises(QubesValueError):
        arun(system.create_vm("AdminVM", name="dom1", label="red"))
    with pytest.raises(QubesValueError, match="reserved"):
        arun(system.create_vm("AppVM", name="default", label="red"))
    assert "bad" not in system.domains and "t2" not in system.domains


def test_netvm_rules(system: Any) -> None:
    app = system
    work, fw, net, vault = (app.domains[n] for n in ("work", "sys-firewall", "sys-net", "vault"))
    with pytest.raises(QubesPropertyValueError, match="does not provide network"):
        work.netvm = vault
    with pytest.raises(QubesPropertyValueError, match="Loops"):
        net.netvm = fw
    with pytest.raises(QubesPropertyValueError, match="Loops"):
        fw.netvm = fw
    with pytest.raises(QubesPropertyValueError, match="still the netvm"):
        fw.provides_network = False
    with pytest.raises(QubesVMNotFoundError):
        work.netvm = "nonexistent"
    work.netvm = "sys-net"
    assert work.netvm is net and not work.property_is_default("netvm")
    del work.netvm
    assert work.netvm is fw
    # default_netvm: must provide network, and must not reach the network through itself
    with pytest.raises(QubesPropertyValueError):
        app.default_netvm = vault
    proxy = work
    proxy.provides_network = True
    with pytest.raises(QubesPropertyValueError, match="through itself"):
        app.default_netvm = proxy  # its netvm follows the default: a loop
    proxy.netvm = net
    app.default_netvm = proxy
    assert app.domains["vault"].netvm is None and fw.netvm is net


def test_default_netvm_change_announces_reset(system: Any) -> None:
    seen = []
    system.add_observer(lambda s, e, k: seen.append((str(s), e)) if "netvm" in e else None)
    system.default_netvm = system.domains["sys-net"]
    assert ("dom0", "property-set:default_netvm") in seen
    assert ("work", "property-reset:netvm") in seen  # follows the default
    assert ("vault", "property-reset:netvm") not in seen  # explicitly none


def test_features_and_tags(system: Any) -> None:
    work, t, dom0 = (system.domains[n] for n in ("work", "debian-12", "dom0"))
    events = []
    system.add_observer(lambda s, e, k: events.append((e, dict(k))))
    t.features["os"] = "Linux"
    dom0.features["gui-default"] = True
    work.features["service.cups"] = False
    assert work.features["service.cups"] == "" and dom0.features["gui-default"] == "1"
    assert work.features.check_with_template("os") == "Linux"
    assert work.features.check_with_template_and_adminvm("gui-default") == "1"
    assert work.features.check_with_template("nope", "dflt") == "dflt"
    with pytest.raises(QubesFeatureNotFoundError):
        work.features.check_with_template("nope")
    with pytest.raises(QubesFeatureNotFoundError):
        del work.features["nope"]
    with pytest.raises(QubesValueError):
        work.features["bad name"] = "x"
    with pytest.raises(QubesValueError):
        work.features["ok"] = "a\0b"
    del work.features["service.cups"]
    assert "service.cups" not in work.features
    assert ("domain-feature-set:os", {"feature": "os", "value": "Linux"}) in events
    assert ("domain-feature-delete:service.cups", {"feature": "service.cups"}) in events
    work.tags.add("my-tag_1")
    assert "my-tag_1" in work.tags and ("domain-tag-add:my-tag_1", {"tag": "my-tag_1"}) in events
    for bad in ("", "a b", "a.b", "é"):
        with pytest.raises(QubesValueError):
            work.tags.add(bad)
    work.tags.remove("my-tag_1")
    with pytest.raises(QubesTagNotFoundError):
        work.tags.remove("my-tag_1")


def test_remove_rules(system: Any, arun: Any) -> None:
    app = system
    with pytest.raises(QubesVMInUseError, match="template"):
        arun(app.remove_vm(app.domains["debian-12"]))
    with pytest.raises(QubesVMInUseError, match="netvm"):
        arun(app.remove_vm(app.domains["sys-net"]))
    with pytest.raises(QubesVMInUseError, match="default_netvm"):
        arun(app.remove_vm(app.domains["sys-firewall"]))
    with pytest.raises(QubesVMInUseError, match="dom0"):
        arun(app.remove_vm(app.domains["dom0"]))
    work = app.domains["work"]
    arun(work.start())
    with pytest.raises(QubesVMNotHaltedError):
        arun(app.remove_vm(work))
    arun(work.shutdown())
    work.installed_by_rpm = True
    with pytest.raises(QubesVMInUseError, match="package manager"):
        arun(app.remove_vm(work))
    work.installed_by_rpm = False
    arun(app.remove_vm(work))
    assert "work" not in app.domains
    assert ("remove_volumes", "work") in app.lifecycle.calls


def test_template_change_retargets_root(system: Any, arun: Any) -> None:
    t2 = arun(system.create_vm("TemplateVM", name="fedora", label="black"))
    work = system.domains["work"]
    work.template = t2
    assert work.volume_config["root"].source == "default:vm-templates/fedora/root"
    arun(work.start())
    with pytest.raises(QubesVMNotHaltedError):
        work.template = system.domains["debian-12"]


def test_memory_rules_and_ranges(system: Any) -> None:
    work = system.domains["work"]
    with pytest.raises(QubesPropertyValueError, match="maxmem"):
        work.memory = 5000
    with pytest.raises(QubesPropertyValueError, match="lower than memory"):
        work.maxmem = 100
    work.maxmem = 0  # no balloon: fixed memory
    work.memory = 5000
    for prop, value in (("vcpus", 0), ("memory", -1), ("qrexec_timeout", 0),
                        ("virt_mode", "xen"), ("default_user", "Root Me"),
                        ("kernel", "../../etc")):
        with pytest.raises(QubesPropertyValueError):
            setattr(work, prop, value)
    with pytest.raises(QubesNoSuchPropertyError):
        work.property_get_def("no_such")


def test_concurrent_creates_of_one_name(system: Any, arun: Any) -> None:
    import asyncio
    lifecycle = system.lifecycle
    original = lifecycle.create_volumes

    async def slow_create(vm: Any) -> None:
        await asyncio.sleep(0.05)
        await original(vm)

    lifecycle.create_volumes = slow_create

    async def race() -> list[Any]:
        return await asyncio.gather(
            system.create_vm("AppVM", name="twin", label="red"),
            system.create_vm("AppVM", name="twin", label="blue"),
            system.create_vm("AppVM", name="other", label="blue"),
            return_exceptions=True)

    results = arun(race())
    assert sum(isinstance(r, QubesValueError) for r in results) == 1
    assert system.domains["twin"].label.name == "red"
    assert system.domains["other"].qid != system.domains["twin"].qid


def test_installed_kernels_follow_the_directory(tmp_path: Any) -> None:
    import os
    import shutil

    from bulkhead.app import App
    from bulkhead.config import Paths

    app = App(Paths.from_env({"BULKHEAD_HOME": str(tmp_path)}))
    assert app.installed_kernels() == []
    kernels = tmp_path / "vm-kernels"
    kernels.mkdir()
    for name in ("6.10", "6.9"):
        (kernels / name).mkdir()
    (kernels / "README").write_text("not a kernel")
    assert app.installed_kernels() == ["6.9", "6.10"]
    os.utime(kernels, ns=(10**9, 10**9))  # changed long ago: the listing is kept...
    app.installed_kernels().append("6.11")  # ...and a caller cannot spoil it
    assert app.installed_kernels() == ["6.9", "6.10"]
    (kernels / "6.11").mkdir()  # ...until the directory changes
    assert app.installed_kernels() == ["6.9", "6.10", "6.11"]
    os.utime(kernels, ns=(2 * 10**9, 2 * 10**9))
    assert app.installed_kernels() == ["6.9", "6.10", "6.11"]
    shutil.rmtree(kernels / "6.9")
    assert app.installed_kernels() == ["6.10", "6.11"]
    assert app.default_kernel == "6.11"
