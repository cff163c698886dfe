"""qvm-volume and qvm-pool."""

from __future__ import annotations

import pytest

from bulkhead import errors
from bulkhead.tools import qvm_pool, qvm_volume
from bulkhead.tools.qvm_volume import parse_size
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")


def setup_list(conn, vms=("vm1", "sys-net")) -> None:
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running",
                                        "vm1 class=AppVM state=Running", "sys-net class=AppVM state=Running")
    for vm in vms:
        conn.expected_calls[(vm, "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
        for vol in ("root", "private"):
            pool = "pool-file" if vol == "root" else "other-pool"
            conn.expected_calls[(vm, "admin.vm.volume.Info", vol, b"")] = (
                f"0\x00pool={pool}\nvid={vm}-{vol}\nsize=10737418240\n".encode())
            conn.expected_calls[(vm, "admin.vm.volume.ListSnapshots", vol, b"")] = (
                b"0\x00snap1\n" if vol == "private" else b"0\x00")


def test_list_like_qubes(app, conn, capsys):
    setup_list(conn)
    assert qvm_volume.main(["ls"], app=app) == 0
    assert capsys.readouterr().out == (
        "POOL:VOLUME                 VMNAME   VOLUME_NAME  REVERT_POSSIBLE\n"
        "other-pool:sys-net-private  sys-net  private      Yes\n"
        "other-pool:vm1-private      vm1      private      Yes\n"
        "pool-file:sys-net-root      sys-net  root         No\n"
        "pool-file:vm1-root          vm1      root         No\n")
    assert qvm_volume.main([], app=app) == 0  # list is the default
    assert capsys.readouterr().out.startswith("POOL:VOLUME")


def test_list_one_domain_and_pool(app, conn, capsys):
    setup_list(conn, vms=("vm1",))
    conn.expected_calls[("dom0", "admin.pool.List", None, b"")] = b"0\x00pool-file\nother-pool\n"
    assert qvm_volume.main(["list", "-p", "pool-file", "vm1"], app=app) == 0
    assert capsys.readouterr().out == ("POOL:VOLUME         VMNAME  VOLUME_NAME  REVERT_POSSIBLE\n"
                                       "pool-file:vm1-root  vm1     root         No\n")
    assert qvm_volume.main(["list", "-p", "nope", "vm1"], app=app) == 2
    assert capsys.readouterr().err == "qvm-volume: error: no such pool: 'nope'\n"


def test_info(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("testvm class=AppVM state=Running")
    conn.expected_calls[("testvm", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    conn.expected_calls[("testvm", "admin.vm.volume.Info", "private", b"")] = (
        b"0\x00pool=default\nvid=appvms/testvm/private\nsize=2147483648\nusage=10000000\n"
        b"rw=True\nsource=\nsave_on_stop=True\nsnap_on_start=False\nrevisions_to_keep=3\n"
        b"is_outdated=False\n")
    conn.expected_calls[("testvm", "admin.vm.volume.ListSnapshots", "private", b"")] = (
        b"0\x00200101010000\n200201010000\n")
    assert qvm_volume.main(["info", "testvm:private"], app=app) == 0
    assert capsys.readouterr().out == (
        "pool               default\n"
        "vid                appvms/testvm/private\n"
        "rw                 True\n"
        "source             \n"
        "save_on_stop       True\n"
        "snap_on_start      False\n"
        "size               2147483648\n"
        "usage              10000000\n"
        "revisions_to_keep  3\n"
        "is_outdated        False\n"
        "Available revisions (for revert):\n"
        "  200101010000\n"
        "  200201010000\n")
    assert qvm_volume.main(["info", "testvm:private", "size"], app=app) == 0
    assert capsys.readouterr().out == "2147483648\n"
    assert qvm_volume.main(["info", "testvm:private", "revisions"], app=app) == 0
    assert capsys.readouterr().out == "200101010000\n200201010000\n"


def test_info_bad_specs(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("testvm class=AppVM state=Running")
    conn.expected_calls[("testvm", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    assert qvm_volume.main(["info", "testvm"], app=app) == 2
    assert "expected a qube and volume like work:private" in capsys.readouterr().err
    assert qvm_volume.main(["info", "testvm:nope"], app=app) == 1
    assert capsys.readouterr().err == "qvm-volume: error: qube 'testvm' has no volume 'nope'\n"
    assert qvm_volume.main(["info", "ghost:root"], app=app) == 2
    assert capsys.readouterr().err == "qvm-volume: error: no such domain: 'ghost'\n"


def test_revert_latest_specific_and_none(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("testvm class=AppVM state=Halted")
    conn.expected_calls[("testvm", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    conn.expected_calls[("testvm", "admin.vm.volume.ListSnapshots", "private", b"")] = (
        b"0\x00200101010000\n200301010000\n")
    conn.expected_calls[("testvm", "admin.vm.volume.Revert", "private", b"200301010000")] = b"0\x00"
    assert qvm_volume.main(["revert", "testvm:private"], app=app) == 0
    conn.expected_calls[("testvm", "admin.vm.volume.Revert", "private", b"200101010000")] = b"0\x00"
    assert qvm_volume.main(["revert", "testvm:private", "200101010000"], app=app) == 0
    conn.expected_calls[("testvm", "admin.vm.volume.ListSnapshots", "root", b"")] = b"0\x00"
    assert qvm_volume.main(["revert", "testvm:root"], app=app) == 1
    assert capsys.readouterr().err == "qvm-volume: error: No snapshots available\n"
    conn.assert_all_called()


def test_resize(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("testvm class=AppVM state=Running")
    conn.expected_calls[("testvm", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    conn.expected_calls[("testvm", "admin.vm.volume.Resize", "private", b"10737418240")] = b"0\x00"
    assert qvm_volume.main(["resize", "testvm:private", "10GiB"], app=app) == 0
    conn.expected_calls[("testvm", "admin.vm.volume.Resize", "private", b"1000000000")] = error(
        "StoragePoolException", "Failed to resize volume: shrink not allowed")
    assert qvm_volume.main(["extend", "testvm:private", "1G"], app=app) == 1
    assert capsys.readouterr().err == ("qvm-volume: error: Failed to resize volume: "
                                       "shrink not allowed\n")
    assert qvm_volume.main(["resize", "testvm:private", "ten"], app=app) == 1
    assert "invalid size: 'ten'" in capsys.readouterr().err


def test_config(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("testvm class=AppVM state=Halted")
    conn.expected_calls[("testvm", "admin.vm.volume.List", None, b"")] = b"0\x00root\nprivate\n"
    conn.expected_calls[("testvm", "admin.vm.volume.Set.revisions_to_keep", "private", b"3")] = b"0\x00"
    assert qvm_volume.main(["set", "testvm:private", "revisions_to_keep", "3"], app=app) == 0
    assert qvm_volume.main(["config", "testvm:private", "invalid", "3"], app=app) == 1
    conn.assert_all_called()


@pytest.mark.parametrize("text,size", [
    ("512", 512), ("10GiB", 10 * 1024 ** 3), ("10Gi", 10 * 1024 ** 3), ("10G", 10 ** 10),
    ("10GB", 10 ** 10), ("5k", 5000), ("5KiB", 5120), ("1M", 10 ** 6), ("1MiB", 1 << 20),
    ("2 GiB", 2 << 30), ("1T", 10 ** 12), ("100B", 100)])
def test_parse_size_follows_qubes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "10X", "10 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(errors.QubesValueError):
        parse_size(text)


# --- qvm-pool --------------------------------------------------------------------

def test_pool_list_and_info(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.pool.List", None, b"")] = b"0\x00default\nvm-kernels\n"
    conn.expected_calls[("dom0", "admin.pool.Info", "default", b"")] = (
        b"0\x00driver=file-qcow2\ndir_path=/var/lib/bulkhead/pools/default\nrevisions_to_keep=1\n"
        b"size=100000\nusage=2000\n")
    conn.expected_calls[("dom0", "admin.pool.Info", "vm-kernels", b"")] = (
        b"0\x00driver=linux-kernel\ndir_path=/var/lib/bulkhead/vm-kernels\n")
    assert qvm_pool.main([], app=app) == 0
    assert capsys.readouterr().out == ("NAME        DRIVER\n"
                                       "default     file-qcow2\n"
                                       "vm-kernels  linux-kernel\n")
    assert qvm_pool.main(["info", "default"], app=app) == 0
    assert capsys.readouterr().out == ("name               default\n"
                                       "driver             file-qcow2\n"
                                       "dir_path           /var/lib/bulkhead/pools/default\n"
                                       "revisions_to_keep  1\n"
                                       "size               100000\n"
                                       "usage              2000\n")
    assert qvm_pool.main(["info", "nope"], app=app) == 1
    assert capsys.readouterr().err == "qvm-pool: error: no such pool: 'nope'\n"


def test_pool_drivers(app, conn, capsys):
    conn.expected_calls[("dom0", "admin.pool.ListDrivers", None, b"")] = (
        b"0\x00file-qcow2 dir_path revisions_to_keep\nlinux-kernel dir_path\n")
    assert qvm_pool.main(["drivers"], app=app) == 0
    assert capsys.readouterr().out == ("DRIVER        OPTIONS\n"
                                       "file-qcow2    dir_path, revisions_to_keep\n"
                                       "linux-kernel  dir_path\n")
