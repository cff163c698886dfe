"""The ``file`` storage pool (bulkhead.storage.file_pool) with the real qemu-img.

No machine runs here: where a qube would write to its disk, the test writes a
known byte pattern into the started (dirty) image with ``qemu-io``, then checks
which committed images carry which pattern after commits, reverts, snapshots
and simulated crashes.  Content is what matters, not that files exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bulkhead.errors import QubesValueError, StoragePoolException
from bulkhead.storage import file_pool, qemu_img
from bulkhead.storage.file_pool import FilePool, FileVolume
from bulkhead.storage.pool import VolumeConfig

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (package qemu-utils)")

MiB = 1024 * 1024
SIZE = 4 * MiB
POOL = "varlibqubes"
CHUNK = 64 * 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- image content, through QEMU's own block layer --------------------------------------

def qemu_io(img: Path, command: str) -> subprocess.CompletedProcess[str]:
    # Read-only (-r), without taking QEMU's image lock (-U): checking never changes an image.
    return subprocess.run(["qemu-io", "-r", "-U", "-c", command, str(img)],
                          capture_output=True, text=True, timeout=30)


def write_pattern(img: Path, byte: int, offset: int = 0, length: int = CHUNK) -> None:
    r = subprocess.run(["qemu-io", "-c", f"write -P {byte:#x} {offset} {length}", str(img)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout


def has_pattern(img: Path, byte: int, offset: int = 0, length: int = CHUNK) -> bool:
    r = qemu_io(img, f"read -P {byte:#x} {offset} {length}")
    out = r.stdout + r.stderr
    if "Pattern verification failed" in out:
        return False
    # Anything else than a clean read (an image qemu-io cannot open...) is an error, so a
    # "not has_pattern" assertion can never pass vacuously.
    assert r.returncode == 0 and f"read {length}/{length} bytes" in out, out
    return True


def info(img: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def check_image(img: Path) -> None:
    """The image is a consistent qcow2 (what a crash must never break)."""
    r = subprocess.run(["qemu-img", "check", "-U", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- volumes ------------------------------------------------------------------------

def make_pool(tmp_path: Path, resolver: Any = None) -> FilePool:
    pool = FilePool(POOL, tmp_path / "pool", resolver=resolver)
    run(pool.setup())
    return pool


def private(pool: FilePool, vid: str = "appvms/work/private", keep: int = 1,
            size: int = SIZE) -> FileVolume:
    return pool.init_volume(vid, VolumeConfig(name="private", pool=POOL, size=size,
                                              save_on_stop=True, revisions_to_keep=keep))


def template_root(pool: FilePool, keep: int = 1) -> FileVolume:
    return pool.init_volume("vm-templates/debian-12/root", VolumeConfig(
        name="root", pool=POOL, size=SIZE, save_on_stop=True, revisions_to_keep=keep))


def app_root(pool: FilePool, size: int = MiB) -> FileVolume:
    return pool.init_volume("appvms/work/root", VolumeConfig(
        name="root", pool=POOL, size=size, snap_on_start=True,
        source=f"{POOL}:vm-templates/debian-12/root"))


def volatile(pool: FilePool, rw: bool = True) -> FileVolume:
    return pool.init_volume("appvms/work/volatile", VolumeConfig(
        name="volatile", pool=POOL, size=SIZE, rw=rw, ephemeral=True))


def session(vol: FileVolume, byte: int, offset: int = 0) -> None:
    """One run of the qube: start, the guest writes ``byte``, stop (commit)."""
    spec = run(vol.start())
    write_pattern(spec.path, byte, offset)
    run(vol.stop())


def tmp_files(vol: FileVolume) -> list[str]:
    return [p.name for p in vol.dir.iterdir() if p.name.startswith(file_pool.TMP_PREFIX)]


# --- create -------------------------------------------------------------------------

def test_create_save_on_stop_makes_an_empty_current(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    assert vol.current == tmp_path / "pool/appvms/work/private/current.qcow2"
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
    assert info(spec.path)["backing-filename"] == "current.qcow2"
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
    assert "backing-filename" not in meta and meta["virtual-size"] == SIZE
    assert has_pattern(vol.current, 0x41)
    assert list(vol.revisions()) == ["1"]
    assert has_pattern(vol.dir / "rev-1.qcow2", 0x00)  # the revision is the content before
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
    assert has_pattern(vol.dir / "rev-2.qcow2", 0x41)
    assert has_pattern(vol.dir / "rev-3.qcow2", 0x42)
    assert not (vol.dir / "rev-1.qcow2").exists()


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
    assert not (app.dir / file_pool.SOURCE_STAMP).exists()
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


# --- crash safety ----------------------------------------------------------------------------

class CrashOnce:
    """Wraps a function so that its first call 'crashes' (raises), later calls go through."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.crashed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.crashed:
            self.crashed = True
            raise OSError("simulated crash")
        return self.real(*args, **kwargs)


def test_crash_before_the_rename_keeps_the_previous_current(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41)
    spec = run(vol.start())
    write_pattern(spec.path, 0x42)

    crash = CrashOnce(os.replace)
    monkeypatch.setattr(file_pool.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run(vol.stop())
    assert crash.crashed
    # The committed image is the previous one, whole; the run's writes wait in dirty.
    check_image(vol.current)
    assert has_pattern(vol.current, 0x41)
    assert vol.is_dirty() and has_pattern(vol.dirty, 0x42)

    # A new daemon (new objects) starts the qube: the leftover is committed first.
    again = private(make_pool(tmp_path))
    spec = run(again.start())
    assert tmp_files(again) == []                        # the half-written temp is gone
    assert has_pattern(again.current, 0x42)
    assert has_pattern(spec.path, 0x42)                  # the new run starts from it
    run(again.stop())
    assert has_pattern(again.current, 0x42)
    check_image(again.current)


def test_crash_after_the_rename_commits_the_same_content_again(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41, offset=0)
    spec = run(vol.start())
    write_pattern(spec.path, 0x42, offset=CHUNK)

    # fsync_dir is first called right after the rename: crash there.
    monkeypatch.setattr(qemu_img, "fsync_dir", CrashOnce(qemu_img.fsync_dir))
    with pytest.raises(OSError, match="simulated crash"):
        run(vol.stop())
    # current is already the new image; the dirty overlay is still there, now over it.
    assert has_pattern(vol.current, 0x42, CHUNK)
    assert vol.is_dirty()

    again = private(make_pool(tmp_path))
    run(again.start())
    run(again.stop())
    assert has_pattern(again.current, 0x41, 0)
    assert has_pattern(again.current, 0x42, CHUNK)
    assert has_pattern(again.current, 0x00, 2 * CHUNK)
    check_image(again.current)


def test_dirty_left_by_a_crash_is_committed_at_next_start(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    spec = run(vol.start())
    write_pattern(spec.path, 0x41)
    # The daemon died with the qube: no stop() ran.  The next daemon starts it again.
    again = private(make_pool(tmp_path))
    assert again.is_dirty()
    spec = run(again.start())
    assert has_pattern(again.current, 0x41)              # what the qube wrote is kept
    assert info(spec.path)["backing-filename"] == "current.qcow2"
    assert has_pattern(spec.path, 0x41)
    write_pattern(spec.path, 0x42, offset=CHUNK)
    run(again.stop())
    assert has_pattern(again.current, 0x41) and has_pattern(again.current, 0x42, CHUNK)


def test_leftover_temp_files_are_cleaned_at_start(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    (vol.dir / ".tmp-commit.qcow2").write_bytes(b"half an image")
    run(vol.start())
    assert tmp_files(vol) == []


def test_crash_during_commit_does_not_cost_an_older_revision(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=2)
    run(vol.create())
    session(vol, 0x41)
    session(vol, 0x42)                   # revisions: 1 (empty), 2 (A); current B
    spec = run(vol.start())
    write_pattern(spec.path, 0x43)
    monkeypatch.setattr(file_pool.os, "replace", CrashOnce(os.replace))
    with pytest.raises(OSError):
        run(vol.stop())
    again = private(make_pool(tmp_path), keep=2)
    run(again.start())                   # recovers: commits C
    assert has_pattern(again.current, 0x43)
    # The state a stop without the crash leaves: current C, kept revisions A and B.
    kept = sorted(again._revision_files())
    contents = [next(b for b in (0x41, 0x42, 0x43, 0x00) if has_pattern(p, b)) for _, p in kept]
    assert contents == [0x41, 0x42]


def test_crash_after_the_rename_keeps_the_previous_revision(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool, keep=1)
    run(vol.create())
    session(vol, 0x41)
    spec = run(vol.start())
    write_pattern(spec.path, 0x42)
    monkeypatch.setattr(qemu_img, "fsync_dir", CrashOnce(qemu_img.fsync_dir))
    with pytest.raises(OSError):
        run(vol.stop())
    again = private(make_pool(tmp_path), keep=1)
    run(again.start())
    assert has_pattern(again.current, 0x42)
    # What a stop without the crash leaves: the one kept revision is A, so revert undoes B.
    [(_, rev)] = again._revision_files()
    assert has_pattern(rev, 0x41)
