"""README command (a) again: it changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def snapshot(bulkhead) -> tuple[str, str, list[str]]:
    ls = bulkhead.tool("qvm-ls", "--raw-data", "--fields", "name,class,label,template,netvm").stdout
    prefs = bulkhead.tool("qubes-prefs").stdout
    files = sorted(str(p.relative_to(bulkhead.home)) for p in (bulkhead.home / "pools").rglob("*")
                   if p.is_file() and "dirty" not in p.name and not p.name.startswith("dirty"))
    return ls, prefs, files


def test_setup_twice_changes_nothing(bulkhead):
    before = snapshot(bulkhead)
    r = subprocess.run([str(Path(sys.executable).parent / "bulkhead"), "setup", "--no-install"],
                       env=bulkhead.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = snapshot(bulkhead)
    assert after == before
    assert "Creating" not in r.stderr and "Importing" not in r.stderr
