"""The store: every qube's definition, in SQLite, changed one transaction at a time.

Qubes rewrites its whole ``qubes.xml`` on every change; Bulkhead keeps the
definitions in a SQLite database (WAL journal, ``synchronous=FULL``) and
writes only what changed, inside one transaction per Admin API change:

- the app calls :meth:`Store.on_event` for every event; the store turns the
  events that change definitions (``property-set:*``, ``property-reset:*``,
  ``domain-feature-set:*``, ``domain-feature-delete:*``, ``domain-tag-add:*``,
  ``domain-tag-delete:*``, ``domain-add``, ``domain-delete``) into rows;
- a change made inside ``with store.transaction():`` commits as a whole or
  not at all (a qube row never appears without its properties); a change
  made outside one commits by itself;
- a transaction is committed, with ``synchronous=FULL``, before the daemon
  answers; so an acknowledged change survives the daemon being killed at any
  moment (and a power loss), and an unacknowledged one is either whole or
  absent.

:meth:`Store.load` rebuilds an app from the database at daemon start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .properties import Property, VMProperty
from .storage.pool import VolumeConfig
from .vm import BaseVM, vm_class

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .pools import PoolDefinition

log = logging.getLogger("bulkhead.store")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS qubes (
    qid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    klass TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS qube_properties (
    qid INTEGER NOT NULL REFERENCES qubes(qid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (qid, name)
);
CREATE TABLE IF NOT EXISTS features (
    qid INTEGER NOT NULL REFERENCES qubes(qid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (qid, name)
);
CREATE TABLE IF NOT EXISTS tags (
    qid INTEGER NOT NULL REFERENCES qubes(qid) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (qid, tag)
);
CREATE TABLE IF NOT EXISTS volumes (
    qid INTEGER NOT NULL REFERENCES qubes(qid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    PRIMARY KEY (qid, name)
);
CREATE TABLE IF NOT EXISTS global_properties (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    driver TEXT NOT NULL,
    config TEXT NOT NULL
);
"""


class Store:
    """The SQLite store of one Bulkhead instance."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the definitions are dom0's business only
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False)
        finally:
            os.umask(old_umask)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer Bulkhead "
                               f"(schema {version} > {SCHEMA_VERSION})")
        # Every statement is CREATE ... IF NOT EXISTS: running it again is harmless.
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._depth = 0
        self.app: "App | None" = None

    def close(self) -> None:
        self._db.close()

    # --- transactions ---------------------------------------------------------------
    _depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit everything written inside as one transaction (nesting joins the outer
        one).  Never await inside: another task's writes would join it."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    # --- writing, driven by events ------------------------------------------------
    def attach(self, app: "App") -> None:
        self.app = app
        app.store = self

    def on_event(self, subject: Any, event: str, kwargs: dict[str, Any]) -> None:
        kind, _, key = event.partition(":")
        app = self.app
        if app is None:
            return
        if subject is app:
            if kind in ("property-set", "property-reset"):
                self._save_global(key)
            elif event == "domain-add":
                self.save_vm(kwargs["vm"])
            elif event == "domain-delete":
                self.delete_vm(kwargs["vm"])
            return
        if not isinstance(subject, BaseVM) or app.domains.get(subject.name) is not subject:
            return
        with self.transaction():
            if kind in ("property-set", "property-reset"):
                self._save_vm_property(subject, key)
            elif kind == "domain-feature-set":
                self._db.execute("INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                                 (subject.qid, key, subject.features[key]))
            elif kind == "domain-feature-delete":
                self._db.execute("DELETE FROM features WHERE qid=? AND name=?",
                                 (subject.qid, key))
            elif kind == "domain-tag-add":
                self._db.execute("INSERT OR IGNORE INTO tags VALUES (?, ?)", (subject.qid, key))
            elif kind == "domain-tag-delete":
                self._db.execute("DELETE FROM tags WHERE qid=? AND tag=?", (subject.qid, key))

    def _save_global(self, name: str) -> None:
        assert self.app is not None
        values = self.app.explicit_properties()
        with self.transaction():
            if name in values:
                prop = self.app.property_get_def(name)
                self._db.execute("INSERT OR REPLACE INTO global_properties VALUES (?, ?)",
                                 (name, prop.to_text(values[name])))
            else:
                self._db.execute("DELETE FROM global_properties WHERE name=?", (name,))

    def _save_vm_property(self, vm: BaseVM, name: str) -> None:
        values = vm.explicit_properties()
        if name in values:
            prop = vm.property_get_def(name)
            self._db.execute("INSERT OR REPLACE INTO qube_properties VALUES (?, ?, ?)",
                             (vm.qid, name, prop.to_text(values[name])))
        else:
            self._db.execute("DELETE FROM qube_properties WHERE qid=? AND name=?",
                             (vm.qid, name))

    def save_vm(self, vm: BaseVM) -> None:
        """Write a whole new qube: its row, properties, features, tags and volumes."""
        with self.transaction():
            self._db.execute("INSERT INTO qubes VALUES (?, ?, ?)",
                             (vm.qid, vm.name, type(vm).__name__))
            for name, value in vm.explicit_properties().items():
                prop = vm.property_get_def(name)
                self._db.execute("INSERT INTO qube_properties VALUES (?, ?, ?)",
                                 (vm.qid, name, prop.to_text(value)))
            self._db.executemany("INSERT INTO features VALUES (?, ?, ?)",
                                 [(vm.qid, k, v) for k, v in vm.features.items()])
            self._db.executemany("INSERT INTO tags VALUES (?, ?)",
                                 [(vm.qid, tag) for tag in vm.tags])
            self._write_volumes(vm)

    def delete_vm(self, vm: BaseVM) -> None:
        with self.transaction():
            # ON DELETE CASCADE takes the properties, features, tags and volumes.
            self._db.execute("DELETE FROM qubes WHERE qid=?", (vm.qid,))

    def save_volume_config(self, vm: BaseVM) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM volumes WHERE qid=?", (vm.qid,))
            self._write_volumes(vm)

    def _write_volumes(self, vm: BaseVM) -> None:
        self._db.executemany("INSERT INTO volumes VALUES (?, ?, ?)",
                             [(vm.qid, name, json.dumps(config.to_dict(), sort_keys=True))
                              for name, config in vm.volume_config.items()])

    def save_pool(self, definition: "PoolDefinition") -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO pools VALUES (?, ?, ?)",
                             (definition.name, definition.driver,
                              json.dumps(definition.config, sort_keys=True)))

    # --- loading ------------------------------------------------------------------
    def load(self, app: "App") -> None:
        """Rebuild ``app`` from the database, silently (loading is not a change)."""
        self.attach(app)
        app.events_enabled = False
        try:
            self._load(app)
        finally:
            app.events_enabled = True
            for vm in app.domains:
                vm.events_enabled = True

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, args).fetchall()

    def _load(self, app: "App") -> None:
        for name, driver, config in self._rows("SELECT name, driver, config FROM pools"):
            app.pools.define(name, driver, json.loads(config), persist=False)

        properties: dict[int, dict[str, str]] = {}
        for qid, name, value in self._rows("SELECT qid, name, value FROM qube_properties"):
            properties.setdefault(qid, {})[name] = value

        # First every qube with its plain properties, then the references between
        # qubes (a netvm may come later in qid order than its clients).
        later: list[tuple[BaseVM, str, str]] = []
        for qid, name, klass in self._rows("SELECT qid, name, klass FROM qubes ORDER BY qid"):
            try:
                vm = vm_class(klass)(app)
            except Exception:  # noqa: BLE001 - a broken row must not stop the daemon
                log.error("qube %r (qid %d) has an unknown class %r; skipped", name, qid, klass)
                continue
            values = properties.get(qid, {})
            values.setdefault("name", name)
            values.setdefault("qid", str(qid))
            for key, text in values.items():
                self._load_value(vm, key, text, later)
            app.domains.add(vm)
        for vm, key, text in later:
            self._load_value(vm, key, text, None)

        for qid, name, value in self._rows("SELECT qid, name, value FROM features"):
            vm = app.domains.get(qid)
            if vm is not None:
                vm.features.load(name, value)
        for qid, tag in self._rows("SELECT qid, tag FROM tags"):
            vm = app.domains.get(qid)
            if vm is not None:
                vm.tags.load(tag)
        for qid, name, config in self._rows("SELECT qid, name, config FROM volumes"):
            vm = app.domains.get(qid)
            if vm is not None:
                vm.volume_config[name] = VolumeConfig.from_dict(json.loads(config))

        later_global: list[tuple[Any, str, str]] = []
        for name, text in self._rows("SELECT name, value FROM global_properties"):
            self._load_value(app, name, text, later_global)
        for holder, key, text in later_global:
            self._load_value(holder, key, text, None)

    @staticmethod
    def _load_value(holder: Any, key: str, text: str,
                    later: list[tuple[Any, str, str]] | None) -> None:
        try:
            prop: Property = holder.property_get_def(key)
            if isinstance(prop, VMProperty) and later is not None:
                later.append((holder, key, text))
                return
            holder.load_property(key, prop.coerce(holder, text))
        except Exception:  # noqa: BLE001 - keep loading the rest, say what was dropped
            log.error("dropping stored property %s=%r of %s", key, text, holder)
