"""What setup does for containment: the qube uid range and the systemd unit."""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path

import pytest

from bulkhead.backend import jail
from bulkhead.config import Paths
from bulkhead.setup import qube_ids, service
from bulkhead.setup.progress import SetupError


def test_range_is_reserved_once_in_both_files(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("writing the id files needs root")
    su, sg = tmp_path / "subuid", tmp_path / "subgid"
    su.write_text("alice:100000:65536")            # no final newline: kept intact
    r = qube_ids.ensure_range(su, sg)
    assert r == jail.IdRange(jail.DEFAULT_BASE, jail.DEFAULT_COUNT)
    assert su.read_text() == f"alice:100000:65536\nbulkhead:{r.base}:{r.count}\n"
    assert sg.read_text() == f"bulkhead:{r.base}:{r.count}\n"
    qube_ids.ensure_range(su, sg)                   # again: nothing changes
    assert su.read_text().count("bulkhead:") == 1
    assert jail.read_range(su, sg) == r


def test_range_never_overlaps_anothers(tmp_path):
    su, sg = tmp_path / "subuid", tmp_path / "subgid"
    su.write_text(f"lxc:{jail.DEFAULT_BASE + 1000}:65536\n")
    with pytest.raises(SetupError, match="overlaps"):
        qube_ids.ensure_range(su, sg)


def unit(paths: Paths) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(service.unit_text(paths, python="/opt/bulkhead/venv/bin/python"))
    return cp


def test_unit_file_runs_the_daemon_with_delegated_cgroups(tmp_path):
    paths = Paths(home=tmp_path / "home", socket=Path("/run/qubesd.sock"), cache=tmp_path / "c")
    u = unit(paths)
    s = u["Service"]
    assert s["Type"] == "forking"          # --detach returns once the socket answers
    assert s["ExecStart"] == "/opt/bulkhead/venv/bin/python -m bulkhead.cli daemon --detach"
    assert s["PIDFile"] == str(paths.pidfile)
    assert s["Delegate"] == "yes"          # per-qube cgroups in the unit's subtree
    assert s["KillMode"] == "process"      # restarting the daemon leaves the qubes running
    env = service.unit_text(paths)
    assert f"Environment=BULKHEAD_HOME={paths.home}" in env
    assert f"Environment=BULKHEAD_SOCKET={paths.socket}" in env
    assert u["Install"]["WantedBy"] == "multi-user.target"
    assert "Description" in u["Unit"]
    # The command it names exists and is the daemon's.
    assert service.unit_text(paths).count(f"ExecStart={sys.executable} -m bulkhead.cli daemon") == 1


def test_unit_installed_only_where_systemd_is_pid1(tmp_path, monkeypatch):
    paths = Paths(home=tmp_path / "home", socket=tmp_path / "s", cache=tmp_path / "c")
    monkeypatch.setattr(service, "systemd_is_pid1", lambda: False)
    assert service.install_unit(paths, unit_dir=tmp_path) is None
    assert not (tmp_path / service.UNIT_NAME).exists()
    monkeypatch.setattr(service, "systemd_is_pid1", lambda: True)
    dest = service.install_unit(paths, unit_dir=tmp_path, run=False)
    assert dest == tmp_path / "bulkhead.service"
    assert dest.read_text() == service.unit_text(paths) and dest.stat().st_mode & 0o777 == 0o644
