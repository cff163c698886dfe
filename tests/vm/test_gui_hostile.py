"""A hostile GUI agent inside a real qube loses its GUI connection, and nothing else.

The attacker (``hostile_gui_guest.py``, run as root in a scratch qube with the
``gui`` feature) takes the qube's GUI port and, once dom0's GUI daemon has
said HELLO, sends one attack.  dom0's GUI daemon for that qube must close the
connection, log why and exit with its violation status; ``work``'s window, on
the same display under ``qvm-start-daemon``, stays; the Bulkhead daemon keeps
serving.  A bad title is not a violation: it is shown cleaned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gui_helpers import UserDisplay, start_daemon, stop

pytestmark = pytest.mark.vm

GUEST_SCRIPT = Path(__file__).with_name("hostile_gui_guest.py")
EXIT_VIOLATION = 3
REASONS = {
    "garbage": "unknown message type",
    "huge": "window size 100000x100000",
    "negative": "window position -100000",
    "overflow": "outside window",
    "windows": "more than 256 windows",
    "short": "pixel data of 100 bytes",
    "long": "pixel data of 800 bytes",
}


@pytest.fixture(scope="module")
def setting(bulkhead, scratch_qube, tmp_path_factory):
    q = scratch_qube
    bulkhead.tool("qvm-features", q, "gui", "1")
    bulkhead.tool("qvm-features", "work", "gui", "1")
    for name in (q, "work"):
        if bulkhead.state(name) != "Halted" and name == "work":
            bulkhead.tool("qvm-shutdown", "--wait", name, timeout=300)
        bulkhead.tool("qvm-start", "--skip-if-running", name, timeout=300)
    bulkhead.run(q, "cat > /run/hg.py", user="root", input=GUEST_SCRIPT.read_text())
    display = UserDisplay(100 + (os.getpid() + 50) % 100)
    logs = tmp_path_factory.mktemp("gui-hostile")
    daemon = start_daemon(display, bulkhead.env, logs, "work")
    bulkhead.run("work", "for i in $(seq 900); do [ -e /tmp/.X11-unix/X0 ] && exit 0; sleep 0.2; "
                         "done; exit 1")
    xterm = subprocess.Popen([sys.executable, "-m", "bulkhead.tools.qvm_run", "work", "xterm"],
                             env=bulkhead.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    display.wait_for(lambda: display.windows("[work]"), 180, "work's window")
    yield q, display, logs
    xterm.kill()
    stop(daemon)
    display.close()


def attack(bulkhead, q: str, display: UserDisplay, logs: Path, kind: str) -> tuple[subprocess.Popen, Path]:
    bulkhead.run(q, "pkill -f hg.py; setsid python3 /run/hg.py %s </dev/null >/run/hg.log 2>&1 &"
                 % kind, user="root")
    deadline = time.monotonic() + 60
    while "seized" not in bulkhead.run(q, "cat /run/hg.log", user="root").stdout:
        assert time.monotonic() < deadline, "the hostile agent did not take the GUI port"
        time.sleep(0.5)
    log = logs / f"guid-{q}-{kind}.log"
    out = open(log, "wb")
    guid = subprocess.Popen([sys.executable, "-m", "bulkhead.gui.guid", q],
                            env=display.env(bulkhead.env), stdout=out, stderr=out)
    return guid, log


@pytest.mark.parametrize("kind", list(REASONS))
def test_violation_closes_only_that_qubes_gui(bulkhead, setting, kind):
    q, display, logs = setting
    guid, log = attack(bulkhead, q, display, logs, kind)
    try:
        code = guid.wait(120)
    finally:
        if guid.poll() is None:
            guid.kill()
    text = log.read_text()
    assert code == EXIT_VIOLATION, text
    assert f"qube {q}: GUI protocol violation" in text and REASONS[kind] in text, text
    assert not display.windows(f"[{q}]")          # its windows are gone
    assert display.windows("[work]")               # another qube's window stays
    assert bulkhead.run("work", "echo still-serving").stdout == "still-serving\n"


def test_bad_title_is_shown_clean(bulkhead, setting):
    q, display, logs = setting
    guid, log = attack(bulkhead, q, display, logs, "title")
    try:
        w = display.wait_for(lambda: display.windows(f"[{q}]"), 60, "the hostile window")[0]
        title = display.title(w)
        assert title == f"[{q}] " + ("evil[2Jname" + "x" * 300)[:128]
        assert guid.poll() is None   # not a violation
    finally:
        guid.kill()
