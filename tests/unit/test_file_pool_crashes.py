"""The file pool when the host dies in the middle of a change: nothing half-written,
no revision lost, the leftovers recovered at the next start.

The main checks crash every operation (commit, the merge of a revision that
fell out of ``revisions_to_keep``, revert) at each of its steps in turn -- every
rename, fsync, marker written and ``qemu-img commit`` -- then look at the volume
through new objects, as a new daemon would: the current content must be the old
or the new one, never a mix; every revision offered for revert must be whole;
and finishing the work must give what an uninterrupted run gives.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Callable

import pytest
from bulkhead.storage import file_volume, qemu_img
from bulkhead.storage.file_volume import FileVolume
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
    image,
)


class SimulatedCrash(Exception):
    pass


class Crasher:
    """Counts the steps of an operation and 'crashes' (raises) at step ``at``, before it runs.

    A crash inside ``qemu-img commit`` or ``rebase`` is modelled as the worst case
    for the image it writes into: the copy finished but nothing after it ran.
    """

    SYNC = ((file_volume.os, "rename"), (file_volume.os, "replace"), (file_volume.os, "unlink"),
            (qemu_img, "fsync_file"), (qemu_img, "fsync_dir"), (file_volume, "_write_atomically"))

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
        self.at = at
        self.count = 0
        self.crashed = False
        self.armed = True
        for owner, name in self.SYNC:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))
        real_commit = qemu_img.commit_into_backing

        async def commit(path: Any) -> None:
            if self._step():
                await real_commit(path)
                raise SimulatedCrash(f"crash inside qemu-img commit (step {self.count})")
            await real_commit(path)
        monkeypatch.setattr(qemu_img, "commit_into_backing", commit)
        real_absorb = qemu_img.absorb_backing

        async def absorb(path: Any) -> None:
            if self._step():
                await real_absorb(path)
                raise SimulatedCrash(f"crash inside qemu-img rebase (step {self.count})")
            await real_absorb(path)
        monkeypatch.setattr(qemu_img, "absorb_backing", absorb)

    def _step(self) -> bool:
        if not self.armed:
            return False
        self.count += 1
        if self.count == self.at:
            self.crashed = True
            self.armed = False   # the 'host' is down: nothing more of this run happens
            return True
        return False

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self._step():
                raise SimulatedCrash(f"crash at step {self.count}")
            return real(*args, **kwargs)
        return step


def content(img: Any) -> tuple[int, int]:
    """The (first chunk, second chunk) bytes an image holds; any other pattern fails."""
    out = []
    for offset in (0, CHUNK):
        found = [b for b in (0x00, 0x41, 0x42, 0x43) if has_pattern(img, b, offset)]
        assert found, f"{img} holds none of the known patterns at {offset}"
        out.append(found[0])
    return out[0], out[1]


def all_images_sound(vol: FileVolume) -> None:
    for _, p in vol._images():
        check_image(p)
    assert tmp_files(vol) == []


def crash_every_step(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                     prepare: Callable[[Any], FileVolume],
                     operation: Callable[[FileVolume], Any],
                     check_after_crash: Callable[[FileVolume], None],
                     finish: Callable[[FileVolume], None],
                     check_final: Callable[[FileVolume], None]) -> int:
    """Run ``operation`` crashing at step 1, 2, ... until it completes; returns the step count."""
    at = 1
    while True:
        base = tmp_path / f"crash-at-{at}"
        vol = prepare(base)
        with monkeypatch.context() as m:
            crasher = Crasher(m, at)
            try:
                run(operation(vol))
            except (SimulatedCrash, file_volume.StoragePoolException) as e:
                assert crasher.crashed, f"failed without a crash: {e}"
        if not crasher.crashed:
            check_final(vol)
            return at - 1
        # A new daemon: new objects over what is on disk.
        again = private(make_pool(base), keep=vol.config.revisions_to_keep)
        check_after_crash(again)
        finish(again)
        again = private(make_pool(base), keep=vol.config.revisions_to_keep)
        check_final(again)
        all_images_sound(again)
        at += 1


# --- commit and merge ---------------------------------------------------------------------

A, B, C = (0x41, 0x41), (0x42, 0x41), (0x42, 0x43)


def _two_sessions(base: Any) -> FileVolume:
    """Images: A (standalone after the empty one was merged), B current; revision A."""
    vol = private(make_pool(base), keep=1)
    run(vol.create())
    spec = run(vol.start())
    write_pattern(spec.path, 0x41, 0)
    write_pattern(spec.path, 0x41, CHUNK)
    run(vol.stop())
    session(vol, 0x42, 0)
    assert content(vol.current) == B and [content(p) for _, p in vol._revision_files()] == [A]
    spec = run(vol.start())
    write_pattern(spec.path, 0x43, CHUNK)   # the run being committed: C
    return vol


def test_commit_and_merge_crashed_at_every_step(tmp_path, monkeypatch):
    def after_crash(vol: FileVolume) -> None:
        now = content(vol.current)
        assert now in (B, C), f"current is a mix: {now}"
        revisions = [content(p) for _, p in vol._revision_files()]
        assert revisions == ([A] if now == B else [B]), revisions
        if now == B:
            assert vol.is_dirty() and content(vol.dirty) == C   # waits to be committed

    def finish(vol: FileVolume) -> None:
        run(vol.stop())         # what a new daemon does: settle (commit a leftover, merge)

    def final(vol: FileVolume) -> None:
        assert content(vol.current) == C
        assert [content(p) for _, p in vol._revision_files()] == [B]
        assert vol.expired() == [] and not vol.is_dirty()
        assert "backing-filename" not in info(vol._images()[0][1])   # the oldest stands alone
        assert not (vol.dir / file_volume.MERGE_STAMP).exists()
        run(vol.revert())
        assert content(vol.current) == B

    steps = crash_every_step(tmp_path, monkeypatch, _two_sessions, lambda v: v.stop(),
                             after_crash, finish, final)
    # fsync + rename + fsync of the commit, then the merge's marker, copy, renames, syncs
    assert steps >= 8


def test_merge_crashed_at_every_step_with_more_revisions(tmp_path, monkeypatch):
    def prepare(base: Any) -> FileVolume:
        vol = private(make_pool(base), keep=9)
        run(vol.create())
        for byte, offset in ((0x41, 0), (0x41, CHUNK), (0x42, 0), (0x43, CHUNK)):
            session(vol, byte, offset)
        # Two revisions kept from now on: the empty image and the first run's fall out.
        return private(make_pool(base), keep=2)

    expected = [(0x42, 0x41), (0x42, 0x43)]       # the two kept revisions, then current

    def merge(vol: FileVolume) -> Any:
        return vol.merge_expired()

    def after_crash(vol: FileVolume) -> None:
        kept = [content(p) for _, p in vol._revision_files()]
        assert kept + [content(vol.current)] == [(0x41, 0x41)] + expected or \
            kept + [content(vol.current)] == [(0x42, 0x41)] + expected[1:] or \
            [content(p) for _, p in vol._revision_files()][-2:] == [(0x41, 0x41), (0x42, 0x41)]
        assert content(vol.current) == (0x42, 0x43)

    def final(vol: FileVolume) -> None:
        assert [content(p) for _, p in vol._revision_files()] == [(0x41, 0x41), (0x42, 0x41)]
        assert content(vol.current) == (0x42, 0x43)
        assert vol.expired() == []

    crash_every_step(tmp_path, monkeypatch, prepare, merge, after_crash,
                     lambda v: run(v.merge_expired()), final)


def test_merge_into_a_bigger_successor_crashed_at_every_step(tmp_path, monkeypatch):
    # The session after the oldest image wrote much more than it: the merge copies the
    # old image's clusters into the successor (rebase), not the successor into it.
    used = []
    real = qemu_img.absorb_backing

    async def absorb(path: Any) -> None:
        used.append(path)
        await real(path)
    monkeypatch.setattr(qemu_img, "absorb_backing", absorb)

    def prepare(base: Any) -> FileVolume:
        vol = private(make_pool(base), keep=9)
        run(vol.create())
        session(vol, 0x41, 0)
        spec = run(vol.start())
        write_pattern(spec.path, 0x42, CHUNK, 16 * CHUNK)
        run(vol.stop())
        session(vol, 0x43, 0)
        return private(make_pool(base), keep=1)    # the empty and the first image fell out

    def after_crash(vol: FileVolume) -> None:
        assert content(vol.current) == (0x43, 0x42)
        for _, p in vol._revision_files():
            assert content(p) == (0x41, 0x42)

    def final(vol: FileVolume) -> None:
        assert content(vol.current) == (0x43, 0x42)
        assert [content(p) for _, p in vol._revision_files()] == [(0x41, 0x42)]
        assert vol.expired() == [] and len(vol._images()) == 2
        assert "backing-filename" not in info(vol._images()[0][1])

    crash_every_step(tmp_path, monkeypatch, prepare, lambda v: v.merge_expired(),
                     after_crash, lambda v: run(v.merge_expired()), final)
    assert used, "the merge never took the rebase path"


def test_a_half_merged_revision_is_never_offered_for_revert(tmp_path):
    # keep=1: images A (expired, being merged), B (revision), C (current).
    vol = private(make_pool(tmp_path), keep=9)
    run(vol.create())
    session(vol, 0x41, 0)
    session(vol, 0x42, CHUNK)
    vol = private(make_pool(tmp_path), keep=1)   # the empty image expired, not yet merged
    images = [p for _, p in vol._images()]
    # The crash left the merge of the oldest image half done: some of its successor's
    # clusters were copied into it, so it no longer is a revision of its own.
    old, successor = images[0], images[1]
    (vol.dir / file_volume.MERGE_STAMP).write_text(old.name)
    subprocess.run(["qemu-io", "-c", f"write -P 0x41 0 {CHUNK}", str(old)], check=True,
                   capture_output=True)
    again = private(make_pool(tmp_path), keep=1)
    assert old not in [p for _, p in again._revision_files()]
    # A revert to the newest revision, then to nothing older: the half-merged image is hidden.
    run(again.revert())
    assert has_pattern(again.current, 0x41, 0) and has_pattern(again.current, 0x00, CHUNK)
    assert again.revisions() == {}
    # The merge is finished at the next chance, and the content is still whole.
    run(again.merge_expired())
    assert len(again._images()) == 1 and not (again.dir / file_volume.MERGE_STAMP).exists()
    assert has_pattern(again.current, 0x41, 0) and has_pattern(again.current, 0x00, CHUNK)
    assert successor.exists()


def test_revert_crashed_at_every_step(tmp_path, monkeypatch):
    def prepare(base: Any) -> FileVolume:
        vol = private(make_pool(base), keep=3)
        run(vol.create())
        for byte in (0x41, 0x42, 0x43):
            session(vol, byte, 0)
        return vol      # current 0x43; revisions empty, 0x41, 0x42

    def after_crash(vol: FileVolume) -> None:
        assert content(vol.current)[0] in (0x43, 0x41)

    def final(vol: FileVolume) -> None:
        assert content(vol.current)[0] == 0x41
        assert [content(p)[0] for _, p in vol._revision_files()] == [0x00]
        assert not (vol.dir / file_volume.REVERT_STAMP).exists()

    def finish(vol: FileVolume) -> None:
        run(vol.stop())        # the new daemon settles the volume: recovery runs
        if content(vol.current)[0] == 0x43:
            run(vol.revert("2"))

    crash_every_step(tmp_path, monkeypatch, prepare, lambda v: v.revert("2"),
                     after_crash, finish, final)


# --- leftovers --------------------------------------------------------------------------------

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
    assert info(spec.path)["backing-filename"] == again.current.name
    assert has_pattern(spec.path, 0x41)
    write_pattern(spec.path, 0x42, offset=CHUNK)
    run(again.stop())
    assert has_pattern(again.current, 0x41) and has_pattern(again.current, 0x42, CHUNK)


def test_leftover_temp_files_are_cleaned_at_start(tmp_path):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    (vol.dir / ".tmp-start.qcow2").write_bytes(b"half an image")
    run(vol.start())
    assert tmp_files(vol) == []


def test_a_start_that_cannot_make_its_overlay_leaves_nothing(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41)

    async def full(path: Any, *args: Any, **kwargs: Any) -> None:
        path.write_bytes(b"QFI\xfb partial")
        raise file_volume.StoragePoolException(
            "qemu-img create failed: Could not write: No space left on device")
    monkeypatch.setattr(qemu_img, "create", full)
    with pytest.raises(file_volume.StoragePoolException, match=r"no space left in pool .* needs"):
        run(vol.start())
    assert tmp_files(vol) == [] and not vol.is_dirty()
    assert has_pattern(vol.current, 0x41)


def test_the_flattening_layout_is_moved_to_a_chain(tmp_path):
    # What the driver before backing chains left: current.qcow2, rev-N.qcow2, and a
    # dirty overlay (a qube that ran when the daemon was upgraded) naming current.qcow2.
    d = tmp_path / "pool" / "appvms" / "work" / "private"
    d.mkdir(parents=True)
    for name, byte in (("rev-1.qcow2", 0x41), ("current.qcow2", 0x42)):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / name), "4M"], check=True)
        write_pattern(d / name, byte)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "current.qcow2", "-F", "qcow2",
                    str(d / "dirty.qcow2")], check=True)
    write_pattern(d / "dirty.qcow2", 0x43, CHUNK)
    (d / "dirty.base").write_text("123:456")
    vol = private(make_pool(tmp_path), keep=2)
    spec = run(vol.start())
    names = sorted(os.listdir(d))
    assert "current.qcow2" not in names and not any(n.startswith("rev-") for n in names)
    assert has_pattern(vol.current, 0x42) and has_pattern(vol.current, 0x43, CHUNK)
    assert [p for p in vol.revisions()] == ["1", "2"]
    assert has_pattern(image(vol, 1), 0x41) and has_pattern(image(vol, 2), 0x42)
    run(vol.stop())
    assert has_pattern(vol.current, 0x42) and has_pattern(vol.current, 0x43, CHUNK)
    assert spec.path == vol.dirty
    assert not (d / "dirty.base").exists()


def test_the_move_to_a_chain_crashed_before_the_dirty_copy_was_pointed_at_it(tmp_path):
    d = tmp_path / "pool" / "appvms" / "work" / "private"
    d.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "current.qcow2"), "4M"],
                   check=True)
    write_pattern(d / "current.qcow2", 0x42)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "current.qcow2", "-F", "qcow2",
                    str(d / "dirty.qcow2")], check=True)
    write_pattern(d / "dirty.qcow2", 0x43, CHUNK)
    (d / "dirty.base").write_text("123:456")
    os.rename(d / "current.qcow2", d / "img-1-0123abcd.qcow2")   # the crash came here
    vol = private(make_pool(tmp_path))
    run(vol.stop())
    assert has_pattern(vol.current, 0x42) and has_pattern(vol.current, 0x43, CHUNK)
    check_image(vol.current)
