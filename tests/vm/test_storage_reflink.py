"""The ``file-reflink`` pool on a filesystem that shares extents: a loop-mounted XFS.

First the driver itself (no qube: the started copy is written with ``qemu-io``),
then a Bulkhead instance whose ``$BULKHEAD_HOME`` is on that XFS: setup must
choose the driver, and a qube's data must survive its commits and a revert.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import CACHE, Instance, _have_built_artifacts, make_instance, teardown_instance
from loopfs import loop_filesystem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from pool_helpers import CHUNK, check_image, has_pattern, info, write_pattern  # noqa: E402

from bulkhead.storage.pool import VolumeConfig  # noqa: E402
from bulkhead.storage.reflink_pool import ReflinkPool, reflink_supported  # noqa: E402

pytestmark = pytest.mark.vm

MiB = 2**20


@pytest.fixture(scope="module")
def xfs() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs is missing: `bulkhead setup` installs xfsprogs")
    with loop_filesystem("xfs", 1280, "reflink-fs") as mnt:
        yield mnt


def run(coro):
    return asyncio.run(coro)


def test_reflink_driver_commits_standalone_images_and_reverts(xfs):
    assert reflink_supported(xfs)
    pool = ReflinkPool("default", xfs / "pool", merge_in_background=False)
    run(pool.setup())
    vol = pool.init_volume("appvms/work/private", VolumeConfig(
        name="private", pool="default", size=64 * MiB, save_on_stop=True, revisions_to_keep=1))
    run(vol.create())
    for byte, offset in ((0x41, 0), (0x42, CHUNK), (0x43, 2 * CHUNK)):
        spec = run(vol.start())
        # The started copy is a copy of the current image sharing its extents, not an overlay.
        assert "backing-filename" not in info(spec.path)
        write_pattern(spec.path, byte, offset)
        run(vol.stop())
    # Every image stands alone; the one that fell out of revisions_to_keep was deleted.
    images = [p for _, p in vol._images()]
    assert len(images) == 2 and all("backing-filename" not in info(p) for p in images)
    for p in images:
        check_image(p)
    assert has_pattern(vol.current, 0x41, 0) and has_pattern(vol.current, 0x43, 2 * CHUNK)
    assert list(vol.revisions()) == [str(vol._images()[0][0])]
    run(vol.revert())
    assert has_pattern(vol.current, 0x42, CHUNK) and has_pattern(vol.current, 0x00, 2 * CHUNK)
    # A resize is a grown copy, the old image left whole.
    run(vol.resize(128 * MiB))
    assert info(vol.current)["virtual-size"] == 128 * MiB
    assert has_pattern(vol.current, 0x42, CHUNK)
    # 16 MiB of data in the current image: a start copies it without taking space.
    spec = run(vol.start())
    write_pattern(spec.path, 0x45, 64 * MiB, 16 * MiB)
    run(vol.stop())
    st = os.statvfs(xfs)
    free = st.f_bavail * st.f_frsize
    spec = run(vol.start())
    st = os.statvfs(xfs)
    assert free - st.f_bavail * st.f_frsize < 2 * MiB
    assert has_pattern(spec.path, 0x45, 64 * MiB, 16 * MiB)
    write_pattern(spec.path, 0x44, 100 * MiB)
    run(vol.stop())
    assert has_pattern(vol.current, 0x44, 100 * MiB)
    assert has_pattern(vol.current, 0x45, 64 * MiB, 16 * MiB)


def test_setup_on_xfs_chooses_file_reflink_and_a_qube_keeps_its_data(xfs):
    if not _have_built_artifacts():
        pytest.fail(f"no kernel or template image in {CACHE}: run scripts/test.sh")
    inst: Instance = make_instance(xfs / "home", "--no-default-qubes")
    try:
        rows = [line.split() for line in inst.tool("qvm-pool", "info", "default").stdout.splitlines()]
        assert ["driver", "file-reflink"] in rows, rows
        q = "t-reflink"
        inst.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=", q)
        inst.tool("qvm-start", q)
        inst.run(q, "echo first > /home/user/v; sync")
        inst.tool("qvm-shutdown", "--wait", q)
        inst.tool("qvm-start", q)
        assert inst.run(q, "cat /home/user/v").stdout == "first\n"
        inst.run(q, "echo second > /home/user/v; sync")
        inst.tool("qvm-shutdown", "--wait", q)
        inst.tool("qvm-volume", "revert", f"{q}:private")
        inst.tool("qvm-start", q)
        assert inst.run(q, "cat /home/user/v").stdout == "first\n"
        inst.tool("qvm-shutdown", "--wait", q)
    finally:
        teardown_instance(inst)
