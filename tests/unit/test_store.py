from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bulkhead.app import App
from bulkhead.lifecycle_fake import FakeLifecycle, fake_pool_factory
from bulkhead.store import Store


def _reload(path: Path) -> App:
    app = App(lifecycle=FakeLifecycle(), pool_factory=fake_pool_factory)
    Store(path).load(app)
    app.initialize()
    return app


def _snapshot(app: App) -> dict[str, Any]:
    """Everything the store must keep, in comparable form."""
    snap: dict[str, Any] = {"global": {k: str(v) for k, v in app.explicit_properties().items()},
                            "pools": {n: (app.pools.definition(n).driver,
                                          app.pools.definition(n).config) for n in app.pools}}
    for vm in app.domains:
        snap[vm.name] = {
            "class": vm.klass,
            "props": {k: str(v) for k, v in vm.explicit_properties().items()},
            "features": dict(vm.features.items()),
            "tags": sorted(vm.tags),
            "volumes": {n: c.to_dict() for n, c in vm.volume_config.items()},
        }
    return snap


def test_roundtrip(system: Any, arun: Any, tmp_path: Path) -> None:
    app = system
    work = app.domains["work"]
    work.memory = 1234
    work.kernelopts = "quiet splash"
    work.debug = True
    work.features["service.cups"] = "1"
    work.tags.add("audited")
    app.domains["dom0"].features["gui-default"] = "1"
    app.default_qrexec_timeout = 120
    arun(app.create_vm("DispVM", name="disp7", label="orange"))
    before = _snapshot(app)
    app.store.close()
    loaded = _reload(tmp_path / "qubes.db")
    assert _snapshot(loaded) == before
    lw = loaded.domains["work"]
    assert lw.template is loaded.domains["debian-12"]  # references resolved to objects
    assert lw.netvm is loaded.domains["sys-firewall"] and lw.property_is_default("netvm")
    assert loaded.default_netvm is loaded.domains["sys-firewall"]
    assert lw.memory == 1234 and lw.debug is True and loaded.default_qrexec_timeout == 120
    assert loaded.domains["disp7"].template is loaded.domains["default-dvm"]
    # events work again after loading, and changes keep being persisted
    lw.vcpus = 3
    loaded.store.close()
    assert _reload(tmp_path / "qubes.db").domains["work"].vcpus == 3


def test_each_change_is_committed_at_once(system: Any, tmp_path: Path) -> None:
    work = system.domains["work"]
    work.label = "purple"
    other = sqlite3.connect(tmp_path / "qubes.db")
    row = other.execute("SELECT value FROM qube_properties WHERE qid=? AND name='label'",
                        (work.qid,)).fetchone()
    assert row == ("purple",)
    work.features["x"] = "1"
    assert other.execute("SELECT value FROM features WHERE qid=? AND name='x'",
                         (work.qid,)).fetchone() == ("1",)
    work.memory = 500
    del work.memory
    assert other.execute("SELECT * FROM qube_properties WHERE qid=? AND name='memory'",
                         (work.qid,)).fetchone() is None
    other.close()


def test_transaction_is_all_or_nothing(system: Any, tmp_path: Path) -> None:
    work = system.domains["work"]
    with pytest.raises(RuntimeError):
        with system.transaction():
            work.features["half"] = "1"
            work.tags.add("half")
            work.vcpus = 3
            raise RuntimeError("crash in the middle")
    system.store.close()
    loaded = _reload(tmp_path / "qubes.db")
    lw = loaded.domains["work"]
    assert "half" not in lw.features and "half" not in lw.tags and lw.property_is_default("vcpus")


def test_no_qube_row_without_its_properties(system: Any, arun: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Store, vm: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Store, "_write_volumes", broken)
    with pytest.raises(OSError):
        arun(system.create_vm("AppVM", name="half", label="red"))
    assert "half" not in system.domains
    assert ("remove_volumes", "half") in system.lifecycle.calls  # its volumes were cleaned
    other = sqlite3.connect(tmp_path / "qubes.db")
    assert other.execute("SELECT * FROM qubes WHERE name='half'").fetchone() is None
    assert other.execute("SELECT count(*) FROM qube_properties WHERE qid NOT IN "
                         "(SELECT qid FROM qubes)").fetchone() == (0,)
    other.close()
    monkeypatch.undo()
    vm = arun(system.create_vm("AppVM", name="half", label="red"))  # name and qid are free again
    assert vm.name == "half"


def test_remove_deletes_everything(system: Any, arun: Any, tmp_path: Path) -> None:
    work = system.domains["work"]
    work.features["f"] = "1"
    qid = work.qid
    arun(system.remove_vm(work))
    other = sqlite3.connect(tmp_path / "qubes.db")
    for table in ("qubes", "qube_properties", "features", "tags", "volumes"):
        assert other.execute(f"SELECT count(*) FROM {table} WHERE qid=?", (qid,)).fetchone() \
            == (0,), table
    other.close()


def test_wal_and_full_sync(app: Any, tmp_path: Path) -> None:
    db = app.store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


def test_corrupt_rows_are_dropped_not_fatal(system: Any, tmp_path: Path) -> None:
    qid = system.domains["work"].qid
    system.store.close()
    conn = sqlite3.connect(tmp_path / "qubes.db")
    conn.execute("INSERT INTO qube_properties VALUES (?, 'memory', 'lots')", (qid,))
    conn.execute("INSERT INTO qube_properties VALUES (?, 'netvm', 'ghost')", (qid,))
    conn.execute("INSERT INTO qubes VALUES (200, 'weird', 'NoSuchClass')")
    conn.commit()
    conn.close()
    loaded = _reload(tmp_path / "qubes.db")
    work = loaded.domains["work"]
    assert work.property_is_default("memory") and work.property_is_default("netvm")
    assert "weird" not in loaded.domains
