"""The seamless GUI against real qubes: their windows on a real X display, framed by dom0.

The "user's display" is an Xvfb started here; ``qvm-start-daemon`` (this
checkout's) runs on it as the desktop session would; ``work`` (blue),
``untrusted`` (red) and ``personal`` get the ``gui`` feature and are
restarted so that their GUI agent runs.
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

QUBES = ("work", "untrusted", "personal")


def wait_x(bulkhead, qube: str) -> None:
    bulkhead.run(qube, "for i in $(seq 900); do [ -e /tmp/.X11-unix/X0 ] && exit 0; "
                       "sleep 0.2; done; exit 1")


@pytest.fixture(scope="module")
def gui_qubes(bulkhead):
    for q in QUBES:
        bulkhead.tool("qvm-features", q, "gui", "1")
        if bulkhead.state(q) != "Halted":
            bulkhead.tool("qvm-shutdown", "--wait", q, timeout=300)
    for q in QUBES:
        bulkhead.tool("qvm-start", q, timeout=300)
    yield QUBES


@pytest.fixture(scope="module")
def display():
    d = UserDisplay(100 + os.getpid() % 100)
    yield d
    d.close()


@pytest.fixture(scope="module")
def desktop(bulkhead, gui_qubes, display, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gui-logs")
    proc = start_daemon(display, bulkhead.env, logs)
    for q in gui_qubes:
        wait_x(bulkhead, q)
    yield display, logs, proc
    stop(proc)


def colour(bulkhead, qube: str) -> int:
    return int(bulkhead.app().domains[qube].label.color, 16)


def open_xterm(bulkhead, qube: str, out_file: str, where: str = "+40+40") -> subprocess.Popen:
    """``qvm-run QUBE xterm`` (it waits for xterm to end: in the background)."""
    cmd = f"rm -f {out_file}; xterm -geometry 60x10{where} -e sh -c 'cat > {out_file}'"
    return subprocess.Popen([sys.executable, "-m", "bulkhead.tools.qvm_run", qube, cmd],
                            env=bulkhead.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_file(bulkhead, qube: str, path: str) -> str:
    return bulkhead.run(qube, f"cat {path} 2>/dev/null || true").stdout


def frame_colour_ok(display: UserDisplay, w, rgb: int) -> bool:
    x, y, width, height = display.geometry(w)
    points = [(x + 1, y + 1), (x + width - 2, y + height // 2), (x + width // 2, y + height - 2)]
    return all(display.pixel(px, py) == rgb for px, py in points)


def test_windows_framed_in_label_colours(bulkhead, desktop):
    display, logs, _ = desktop
    work_x = open_xterm(bulkhead, "work", "/tmp/typed")
    untrusted_x = open_xterm(bulkhead, "untrusted", "/tmp/typed", "+520+260")
    try:
        w = display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")[0]
        u = display.wait_for(lambda: display.windows("[untrusted]"), 120, "an [untrusted] window")[0]
        assert display.title(w).startswith("[work] ")
        assert w.get_wm_class()[1].startswith("work:"), w.get_wm_class()
        assert u.get_wm_class()[1].startswith("untrusted:")
        display.wait_for(lambda: frame_colour_ok(display, w, colour(bulkhead, "work")), 30,
                         "work's frame in blue")
        display.wait_for(lambda: frame_colour_ok(display, u, colour(bulkhead, "untrusted")), 30,
                         "untrusted's frame in red")
        assert colour(bulkhead, "work") != colour(bulkhead, "untrusted")
        # The inside is the qube's pixels (xterm's white background), not the frame.
        x, y, width, height = display.geometry(w)
        display.wait_for(lambda: display.pixel(x + width // 2, y + height // 2) !=
                         colour(bulkhead, "work"), 30, "xterm's pixels inside the frame")
        if os.environ.get("BULKHEAD_GUI_SCREENSHOT"):
            time.sleep(2)
            display.screenshot_png(Path(os.environ["BULKHEAD_GUI_SCREENSHOT"]))
    finally:
        work_x.kill()
        untrusted_x.kill()


def test_keyboard_reaches_only_the_focused_qube(bulkhead, desktop):
    display, _, _ = desktop
    bulkhead.run("work", "pkill xterm; true")
    bulkhead.run("personal", "pkill xterm; true")
    display.wait_for(lambda: not display.windows("[work]"), 30, "old windows to go")
    procs = [open_xterm(bulkhead, "work", "/tmp/typed"),
             open_xterm(bulkhead, "personal", "/tmp/typed", "+520+260")]
    try:
        w = display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")[0]
        display.wait_for(lambda: display.windows("[personal]"), 120, "a [personal] window")
        time.sleep(2)   # xterm ready to read its keyboard
        display.xdotool("windowfocus", "--sync", str(w.id))
        display.xdotool("type", "--delay", "30", "secret words")
        display.xdotool("key", "Return")
        got = display.wait_for(lambda: "secret words" in read_file(bulkhead, "work", "/tmp/typed")
                               and read_file(bulkhead, "work", "/tmp/typed"), 30, "typed text in work")
        assert got == "secret words\n"
        assert read_file(bulkhead, "personal", "/tmp/typed") == ""
    finally:
        for p in procs:
            p.kill()


def set_clipboard(bulkhead, qube: str, text: str) -> None:
    """``text`` on the qube's own clipboard (xclip holds it), once the qube says so."""
    bulkhead.run(qube, f"pkill xclip; printf '{text}' | xclip -selection clipboard "
                       ">/dev/null 2>&1 &")
    deadline = time.monotonic() + 30
    while bulkhead.run(qube, "xclip -o -selection clipboard 2>/dev/null; true").stdout != text:
        assert time.monotonic() < deadline, f"{qube}'s clipboard was not set"
        time.sleep(0.3)


def test_clipboard_copy_and_paste_between_qubes(bulkhead, desktop):
    display, logs, _ = desktop
    procs = [open_xterm(bulkhead, "work", "/tmp/c"),
             open_xterm(bulkhead, "personal", "/tmp/c", "+520+260")]
    try:
        display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")
        display.wait_for(lambda: display.windows("[personal]"), 120, "a [personal] window")
        # Each qube's X server runs now (its window shows): set its clipboard.
        set_clipboard(bulkhead, "work", "from work")
        set_clipboard(bulkhead, "personal", "old")
        display.focus("[work]")
        display.xdotool("key", "ctrl+shift+c")
        clip = logs / "clip" / "clipboard.data"
        display.wait_for(lambda: clip.exists() and clip.read_bytes() == b"from work", 30,
                         "the global clipboard")
        display.wait_for(lambda: display.windows("Bulkhead notice"), 10, "the copy notice")
        display.focus("[personal]")
        display.xdotool("key", "ctrl+shift+v")
        display.wait_for(lambda: bulkhead.run("personal", "xclip -o -selection clipboard").stdout
                         == "from work", 30, "the paste in personal")
        assert not clip.exists()   # a copy is pasted once
        log = (logs / "guid.personal.log").read_text()
        assert "pasted 9 bytes from work" in log
    finally:
        for pr in procs:
            pr.kill()


def test_close_asks_the_qube_and_a_stopped_qube_takes_its_windows(bulkhead, desktop):
    from Xlib.protocol import event
    display, _, _ = desktop
    bulkhead.run("work", "pkill xterm; true")
    display.wait_for(lambda: not display.windows("[work]"), 30, "old windows to go")
    procs = [open_xterm(bulkhead, "work", "/tmp/x"),
             open_xterm(bulkhead, "untrusted", "/tmp/x", "+520+260")]
    try:
        w = display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")[0]
        display.wait_for(lambda: display.windows("[untrusted]"), 120, "an [untrusted] window")
        # What a window manager's close button does: WM_DELETE_WINDOW to the dom0 window.
        d = display.d
        ev = event.ClientMessage(window=w, client_type=d.intern_atom("WM_PROTOCOLS"),
                                 data=(32, [d.intern_atom("WM_DELETE_WINDOW"), 0, 0, 0, 0]))
        w.send_event(ev)
        d.flush()
        display.wait_for(lambda: not display.windows("[work]"), 30, "work's window to close")
        assert bulkhead.run("work", "pgrep -x xterm || echo none").stdout == "none\n"
        bulkhead.tool("qvm-shutdown", "--wait", "untrusted", timeout=300)
        display.wait_for(lambda: not display.windows("[untrusted]"), 30,
                         "the stopped qube's windows to go")
    finally:
        for p in procs:
            p.kill()


def test_confirm_before_paste_refused(bulkhead, desktop, tmp_path):
    display, _, main_daemon = desktop
    stop(main_daemon)   # the session's daemon steps aside for one that asks before pasting
    display.wait_for(lambda: not display.windows("[work]") and not display.windows("[personal]"),
                     30, "the windows of the stopped daemon to go")
    logs = tmp_path / "logs"
    proc = start_daemon(display, bulkhead.env, logs, "--confirm-paste")
    procs = [open_xterm(bulkhead, "work", "/tmp/c"),
             open_xterm(bulkhead, "personal", "/tmp/c", "+520+260")]
    try:
        display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")
        display.wait_for(lambda: display.windows("[personal]"), 120, "a [personal] window")
        set_clipboard(bulkhead, "work", "not this")
        set_clipboard(bulkhead, "personal", "kept")
        display.focus("[work]")
        display.xdotool("key", "ctrl+shift+c")
        clip = logs / "clip" / "clipboard.data"
        display.wait_for(lambda: clip.exists(), 30, "the global clipboard")
        display.focus("[personal]")
        display.xdotool("key", "ctrl+shift+v")
        dialog = display.wait_for(lambda: display.windows("Bulkhead: paste?"), 30, "the prompt")[0]
        display.xdotool("windowfocus", "--sync", str(dialog.id))
        display.xdotool("key", "Escape")
        display.wait_for(lambda: not display.windows("Bulkhead: paste?"), 30, "the prompt to close")
        time.sleep(2)
        assert bulkhead.run("personal", "xclip -o -selection clipboard").stdout == "kept"
        assert clip.exists()   # refused: the clipboard is still there
        assert "refused by the user" in (logs / "guid.personal.log").read_text()
    finally:
        for pr in procs:
            pr.kill()
        stop(proc)
