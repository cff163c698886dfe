"""The file pool when the host dies in the middle of a commit: nothing half-written,
no revision lost, the leftovers recovered at the next start."""

from __future__ import annotations

import os
from typing import Any
import pytest
from bulkhead.storage import file_pool, qemu_img
from pool_helpers import (
    CHUNK,
    run,
    write_pattern,
    has_pattern,
    info,
    check_image,
    make_pool,
    private,
    session,
    tmp_files,
)


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
