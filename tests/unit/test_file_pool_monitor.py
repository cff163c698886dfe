"""The pools' usage monitor: one warning event per crossing of 90 %, re-armed below 88 %;
and the file pool's reserve, given up when a start finds the disk full."""

from __future__ import annotations

from typing import Any

import pytest

from bulkhead.storage import file_pool, monitor, qemu_img
from pool_helpers import make_pool, private, run, session, tmp_files


class Pool:
    def __init__(self, size: int, used: int) -> None:
        self.size, self.used = size, used

    def space(self) -> tuple[int, int, int]:
        return self.size, self.used, self.size - self.used


class App:
    def __init__(self, pools: dict[str, Any]) -> None:
        self.pools = pools
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fire_event(self, event: str, **kwargs: Any) -> None:
        self.events.append((event, kwargs))


def test_warning_fires_once_per_crossing_and_rearms():
    pool = Pool(1000, 500)
    app = App({"default": pool, "linux-kernel": object()})   # a pool without space(): skipped
    m = monitor.DiskMonitor(app)
    m.check()
    assert app.events == [] and m.warnings == {}
    pool.used = 905
    m.check()
    m.check()
    assert [e for e, _ in app.events] == ["pool-usage-warning"]
    assert app.events[0][1] == {"pool": "default", "usage": "905", "size": "1000", "percent": "90"}
    assert "default" in m.warnings
    pool.used = 890                    # between the thresholds: still warned, no new event
    m.check()
    assert len(app.events) == 1 and "default" in m.warnings
    pool.used = 870                    # below 88 %: re-armed
    m.check()
    assert m.warnings == {}
    pool.used = 950
    m.check()
    assert len(app.events) == 2


def test_a_start_on_a_full_pool_gives_up_the_reserve_and_starts(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    monkeypatch.setattr(file_pool, "RESERVE_BYTES", 1 << 20)
    pool.keep_reserve()
    assert pool.reserve_path.exists()
    vol = private(pool)
    run(vol.create())
    session(vol, 0x41)
    real = qemu_img.create
    calls = []

    async def full_until_reserve_gone(path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if pool.reserve_path.exists():
            path.write_bytes(b"QFI\xfb partial")
            raise file_pool.StoragePoolException(
                "qemu-img create failed: Could not write: No space left on device")
        await real(path, *args, **kwargs)
    monkeypatch.setattr(qemu_img, "create", full_until_reserve_gone)
    spec = run(vol.start())
    assert spec.path == vol.dirty and len(calls) == 2 and tmp_files(vol) == []
    assert not pool.reserve_path.exists()
    run(vol.stop())
    pool.keep_reserve()                # room again: the reserve comes back
    assert pool.reserve_path.exists()


def test_no_reserve_means_a_clear_refusal(tmp_path, monkeypatch):
    pool = make_pool(tmp_path)
    vol = private(pool)
    run(vol.create())
    pool.reserve_path.unlink(missing_ok=True)
    monkeypatch.setattr(pool, "space", lambda: (100 << 20, 100 << 20, 0))

    async def full(path: Any, *args: Any, **kwargs: Any) -> None:
        raise file_pool.StoragePoolException("qemu-img create failed: No space left on device")
    monkeypatch.setattr(qemu_img, "create", full)
    with pytest.raises(file_pool.StoragePoolException,
                       match=r"volume appvms/work/private: no space left in pool varlibqubes .*"
                             r"needs about 0\.2 MiB more, 0\.0 MiB free"):
        run(vol.start())
    assert not vol.is_dirty() and tmp_files(vol) == []
