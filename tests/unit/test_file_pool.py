"""The ``file`` storage pool (bulkhead.storage.file_pool) with the real qemu-img.

No machine runs here: where a qube would write to its disk, the test writes a
known byte pattern into the started (dirty) image with ``qemu-io``, then checks
which committed images carry which pattern after commits, reverts, snapshots
and simulated crashes.  Content is what matters, not that files exist.
"""

from __future__ import annotations

import subprocess
from typing import Any
import pytest
from bulkhead.errors import QubesValueError, StoragePoolException
from bulkhead.storage import file_volume
from bulkhead.storage.file_pool import FilePool
from bulkhead.storage.pool import VolumeConfig
from pool_helpers import (
    MiB,
    SIZE,
    POOL,
    CHUNK,
    run,
    write_pattern,
    has_pattern,
    info,
    check_image,
    make_pool,
    private,
    template_root,
    app_root,
    volatile,
    session,
    tmp_files,
    image,
    chain,
)


# --- create -------------------------------------------------------------------------

def test_create_save_on_stop_makes_an_empty_current(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    assert vol.current.parent == tmp_path / "pool/appvms/work/private"
    assert vol.current.name.startswith("img-1-")
    meta = info(vol.current)
    assert meta["format"] == "qcow2" and meta["virtual-size"] == SIZE
    assert "backing-filename" not in meta          # standalone, not an overlay
    assert has_pattern(vol.current, 0x00)          # empty: reads as zeros
    assert vol.committed_path() == vol.current and vol.path == str(vol.current)
    assert not vol.is_dirty() and vol.revisions() == {}
    assert tmp_files(vol) == []
    # Creating again keeps what is there.
    write_pattern(vol.current, 0x11)
    run(vol.create())
    assert has_pattern(vol.current, 0x11)


def test_create_snapshot_and_volatile_make_no_image(tmp_path):
    pool = make_pool(tmp_path)
    for vol in (app_root(pool), volatile(pool)):
        run(vol.create())
        assert vol.dir.is_dir()
        assert vol.committed_path() is None
        assert not vol.is_dirty()


def test_start_without_create_is_refused(tmp_path):
    vol = private(make_pool(tmp_path))
    with pytest.raises(StoragePoolException, match="no committed image"):
        run(vol.start())


@pytest.mark.parametrize("vid", ["", "../escape", "a/../b", "a//b", "/abs", "a/./b"])
def test_volume_ids_cannot_leave_the_pool(tmp_path, vid):
    pool = make_pool(tmp_path)
    with pytest.raises(QubesValueError):
        pool.volume_dir(vid)


# --- save_on_stop ----------------------------------------------------------------------

def test_start_gives_an_overlay_and_leaves_current_untouched(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    spec = run(vol.start())
    assert spec.name == "private" and spec.fmt == "qcow2" and not spec.readonly
    assert spec.path == vol.dirty and vol.is_dirty()
    assert info(spec.path)["backing-filename"] == vol.current.name
    write_pattern(spec.path, 0x41)
    # The guest's writes land in the dirty overlay only.
    assert has_pattern(spec.path, 0x41)
    assert has_pattern(vol.current, 0x00)


def test_stop_commits_a_new_current_and_keeps_the_old_as_revision(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    old_inode = vol.current.stat().st_ino
    session(vol, 0x41)
    assert not vol.is_dirty()
    assert vol.current.stat().st_ino != old_inode      # a new image, not written in place
    meta = info(vol.current)
    # Constant time: the run's overlay itself became the current image, on the old one.
    assert meta["backing-filename"] == image(vol, 1).name and meta["virtual-size"] == SIZE
    assert has_pattern(vol.current, 0x41)
    assert list(vol.revisions()) == ["1"]
    assert has_pattern(image(vol, 1), 0x00)            # the revision is the content before
    assert tmp_files(vol) == []
    assert vol.usage > 0


def test_revisions_to_keep_prunes_the_oldest(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=2)
    run(vol.create())
    for byte in (0x41, 0x42, 0x43):
        session(vol, byte)
    assert has_pattern(vol.current, 0x43)
    # create->A->B->C gives revisions 1 (empty), 2 (A), 3 (B); two are kept.
    assert list(vol.revisions()) == ["2", "3"]
    assert has_pattern(image(vol, 2), 0x41)
    assert has_pattern(image(vol, 3), 0x42)
    # The empty image fell out: merged into its successor, which now stands alone.
    assert [n for n, _ in vol._images()] == [2, 3, 4]
    assert chain(vol) == [None, image(vol, 2).name, image(vol, 3).name]
    assert vol.expired() == []


def test_revisions_to_keep_zero_keeps_none(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=0)
    run(vol.create())
    session(vol, 0x41)
    session(vol, 0x42)
    assert vol.revisions() == {}
    assert has_pattern(vol.current, 0x42)


def test_commits_accumulate_writes(tmp_path):
    # Each run's overlay sits on the last commit: earlier writes survive later runs.
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41, offset=0)
    session(vol, 0x42, offset=CHUNK)
    assert has_pattern(vol.current, 0x41, 0) and has_pattern(vol.current, 0x42, CHUNK)


def test_stop_without_start_changes_nothing(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    ino = vol.current.stat().st_ino
    run(vol.stop())
    assert vol.current.stat().st_ino == ino and vol.revisions() == {}


# --- revert -----------------------------------------------------------------------------

def test_revert_to_latest_and_by_id(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=3)
    run(vol.create())
    for byte in (0x41, 0x42, 0x43):
        session(vol, byte)
    assert list(vol.revisions()) == ["1", "2", "3"]      # empty, A, B

    run(vol.revert())                                   # latest: B
    assert has_pattern(vol.current, 0x42)
    assert list(vol.revisions()) == ["1", "2"]

    run(vol.revert("2"))                                # by id: A
    assert has_pattern(vol.current, 0x41)
    assert list(vol.revisions()) == ["1"]

    with pytest.raises(QubesValueError, match="no revision '7'"):
        run(vol.revert("7"))
    assert has_pattern(vol.current, 0x41)

    run(vol.revert("1"))
    assert has_pattern(vol.current, 0x00)
    with pytest.raises(StoragePoolException, match="no revision"):
        run(vol.revert())
    check_image(vol.current)


def test_revert_refused_while_started(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41)
    spec = run(vol.start())
    write_pattern(spec.path, 0x42)
    with pytest.raises(StoragePoolException, match="while its qube is running"):
        run(vol.revert())
    assert has_pattern(vol.current, 0x41) and list(vol.revisions()) == ["1"]
    run(vol.stop())
    assert has_pattern(vol.current, 0x42)


def test_commit_after_revert_continues_from_the_reverted_content(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=2)
    run(vol.create())
    session(vol, 0x41, offset=0)
    session(vol, 0x42, offset=CHUNK)
    run(vol.revert())                                   # back to "A only"
    session(vol, 0x43, offset=2 * CHUNK)
    assert has_pattern(vol.current, 0x41, 0)
    assert has_pattern(vol.current, 0x00, CHUNK)        # B was reverted away
    assert has_pattern(vol.current, 0x43, 2 * CHUNK)


# --- snap_on_start -----------------------------------------------------------------------

def test_snapshot_of_the_source_committed_image(tmp_path):
    pool = make_pool(tmp_path)
    tpl = template_root(pool)
    run(tpl.create())
    session(tpl, 0x54)
    app = app_root(pool)
    run(app.create())

    spec = run(app.start())
    assert spec.path == app.dirty and spec.name == "root"
    assert has_pattern(spec.path, 0x54)                 # sees the template's content
    # The snapshot is as big as the template's root, not the AppVM's smaller setting.
    assert info(spec.path)["virtual-size"] == SIZE
    assert not app.is_outdated()

    # The AppVM writing to its root never reaches the template.
    write_pattern(spec.path, 0x61)
    assert has_pattern(tpl.current, 0x54)

    # The template commits again: the running AppVM's snapshot is now outdated.
    session(tpl, 0x55)
    assert app.is_outdated()
    assert app.info()["is_outdated"] == "True"

    # Stopping throws the snapshot away, and the next start sees the new template.
    run(app.stop())
    assert not app.is_dirty() and not app.is_outdated()
    assert not (app.dir / file_volume.SOURCE_STAMP).exists()
    assert app.committed_path() is None
    spec = run(app.start())
    assert has_pattern(spec.path, 0x55)
    run(app.stop())


def test_snapshot_ignores_the_running_source_uncommitted_writes(tmp_path):
    pool = make_pool(tmp_path)
    tpl = template_root(pool)
    run(tpl.create())
    session(tpl, 0x54)
    tpl_spec = run(tpl.start())
    write_pattern(tpl_spec.path, 0x99)                  # the template is running, uncommitted
    app = app_root(pool)
    spec = run(app.start())
    assert has_pattern(spec.path, 0x54)


def test_snapshot_through_an_explicit_resolver(tmp_path):
    # The lifecycle owns all pools and resolves "pool:vid" itself; the pool must use it.
    asked = []
    other = FilePool("other", tmp_path / "other")
    run(other.setup())
    src = template_root(other)
    run(src.create())
    session(src, 0x77)

    def resolver(source: str) -> Any:
        asked.append(source)
        return src

    pool = make_pool(tmp_path, resolver=resolver)
    app = app_root(pool)
    spec = run(app.start())
    assert asked == [f"{POOL}:vm-templates/debian-12/root"]
    assert has_pattern(spec.path, 0x77)


def test_snapshot_of_a_source_without_committed_image_is_refused(tmp_path):
    pool = make_pool(tmp_path)
    template_root(pool)                                  # known, never created
    app = app_root(pool)
    with pytest.raises(StoragePoolException, match="no committed image"):
        run(app.start())
    nosource = pool.init_volume("appvms/x/root", VolumeConfig(
        name="root", pool=POOL, size=SIZE, snap_on_start=True))
    with pytest.raises(StoragePoolException, match="no source"):
        run(nosource.start())


def test_outdated_after_source_revert(tmp_path):
    pool = make_pool(tmp_path)
    tpl = template_root(pool)
    run(tpl.create())
    session(tpl, 0x54)
    app = app_root(pool)
    run(app.start())
    run(tpl.revert())
    assert app.is_outdated()


# --- volatile ----------------------------------------------------------------------------

def test_volatile_is_fresh_at_each_start_and_gone_at_stop(tmp_path):
    pool = make_pool(tmp_path)
    vol = volatile(pool)
    run(vol.create())
    spec = run(vol.start())
    assert spec.path == vol.dirty and not spec.readonly
    assert "backing-filename" not in info(spec.path)
    write_pattern(spec.path, 0x56)
    run(vol.stop())
    assert not vol.dirty.exists() and vol.committed_path() is None
    spec = run(vol.start())
    assert has_pattern(spec.path, 0x00)                  # nothing of the last run
    run(vol.stop())


def test_volatile_left_over_from_a_crash_is_discarded_at_start(tmp_path):
    pool = make_pool(tmp_path)
    vol = volatile(pool)
    spec = run(vol.start())
    write_pattern(spec.path, 0x56)
    # No stop (the daemon died); a new daemon starts the qube again.
    again = volatile(make_pool(tmp_path))
    spec = run(again.start())
    assert has_pattern(spec.path, 0x00)


def test_read_only_volume_is_given_read_only(tmp_path):
    spec = run(volatile(make_pool(tmp_path), rw=False).start())
    assert spec.readonly


# --- resize --------------------------------------------------------------------------------

def test_resize_grows_and_flags_the_filesystem(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41)
    assert not vol.fs_resize_pending()
    run(vol.resize(2 * SIZE))
    assert vol.size == 2 * SIZE
    assert info(vol.current)["virtual-size"] == 2 * SIZE
    assert has_pattern(vol.current, 0x41)                # data kept
    assert vol.fs_resize_pending()
    vol.clear_fs_resize()
    assert not vol.fs_resize_pending()
    # The next start's overlay has the new size.
    spec = run(vol.start())
    assert info(spec.path)["virtual-size"] == 2 * SIZE
    run(vol.stop())


def test_shrinking_is_refused(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    with pytest.raises(QubesValueError, match="shrinking"):
        run(vol.resize(SIZE - MiB))
    assert vol.size == SIZE and info(vol.current)["virtual-size"] == SIZE
    assert not vol.fs_resize_pending()


def test_resize_refused_while_started(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    run(vol.start())
    with pytest.raises(StoragePoolException, match="running"):
        run(vol.resize(2 * SIZE))
    assert vol.size == SIZE and info(vol.current)["virtual-size"] == SIZE


# --- import and clone ------------------------------------------------------------------------

def test_import_data_from_a_raw_file(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.write(b"\x5a" * CHUNK)
        f.truncate(MiB)                                  # smaller than the volume
    run(vol.import_data(raw))
    meta = info(vol.current)
    assert "backing-filename" not in meta
    assert meta["virtual-size"] == SIZE                  # grown to the volume's size
    assert has_pattern(vol.current, 0x5A)
    assert has_pattern(vol.current, 0x00, CHUNK)
    assert list(vol.revisions()) == ["1"]                # the previous content is kept
    assert raw.read_bytes()[:4] == b"\x5a" * 4            # the source is untouched

    # A bigger image makes the volume bigger.
    with open(raw, "r+b") as f:
        f.truncate(2 * SIZE)
    run(vol.import_data(raw))
    assert vol.size == 2 * SIZE == info(vol.current)["virtual-size"]


def test_import_refused_while_started(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    run(vol.start())
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * CHUNK)
    with pytest.raises(StoragePoolException, match="running"):
        run(vol.import_data(raw))


def test_import_of_raw_bytes_never_follows_a_backing_file(tmp_path):
    # A raw disk image can hold any bytes -- e.g. one written by a qube.  If those bytes
    # form a qcow2 header naming a backing file, probing turns the import into a read of
    # that file (another qube's volume, or any file dom0 can read).
    secret = tmp_path / "secret.raw"
    with open(secret, "wb") as f:
        f.write(b"\x53" * CHUNK)
        f.truncate(MiB)
    crafted = tmp_path / "innocent.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(crafted), str(MiB)], check=True)
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    try:
        run(vol.import_data(crafted))
    except StoragePoolException:
        return                                          # refusing the image is a fine fix
    assert not has_pattern(vol.current, 0x53), "the import copied the backing file's content"


def test_clone_from_copies_committed_content(tmp_path):
    pool = make_pool(tmp_path)
    src = private(pool, "appvms/work/private", size=2 * SIZE)
    run(src.create())
    session(src, 0x43)
    dst = private(pool, "appvms/copy/private")
    run(dst.create())
    run(dst.clone_from(src))
    assert has_pattern(dst.current, 0x43)
    assert dst.size == 2 * SIZE
    assert "backing-filename" not in info(dst.current)   # independent of the source
    assert dst.current.stat().st_ino != src.current.stat().st_ino
    session(dst, 0x44)
    assert has_pattern(src.current, 0x43)                # the source is unaffected


def test_clone_from_a_volume_without_content_is_refused(tmp_path):
    pool = make_pool(tmp_path)
    dst = private(pool)
    with pytest.raises(StoragePoolException, match="no committed content"):
        run(dst.clone_from(volatile(pool)))


# --- remove ------------------------------------------------------------------------------------

def test_remove_deletes_everything_and_prunes_empty_parents(tmp_path):
    pool = make_pool(tmp_path)
    work = private(pool, "appvms/work/private")
    sibling = private(pool, "appvms/other/private")
    for v in (work, sibling):
        run(v.create())
    session(work, 0x41)
    run(work.start())                                    # even a leftover dirty goes
    run(work.remove())
    assert not (tmp_path / "pool/appvms/work").exists()  # the qube's directory, now empty
    assert (tmp_path / "pool/appvms").is_dir()           # not empty: the sibling lives there
    assert sibling.current.exists()
    run(sibling.remove())
    assert not (tmp_path / "pool/appvms").exists()
    assert (tmp_path / "pool").is_dir()                  # the pool's own directory stays
    run(sibling.remove())                                # removing twice is harmless
