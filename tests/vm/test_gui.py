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

from gui_helpers import SCREEN, UserDisplay, start_daemon, stop

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


QUBE_WINDOWS = r"""
from Xlib import display
d = display.Display(":0")
s = d.screen()
print("screen %dx%d" % (s.width_in_pixels, s.height_in_pixels))
for w in s.root.query_tree().children:
    c = w.get_wm_class()
    if c and c[1] == "XTerm" and w.get_attributes().map_state == 2:
        g = w.get_geometry()
        print("xterm %d %d %d %d" % (g.x, g.y, g.width, g.height))
"""


def in_qube_x(bulkhead, qube: str) -> list[str]:
    """What the qube's own X server says: its screen size, its mapped xterms' geometry."""
    return bulkhead.run(qube, "python3 -", input=QUBE_WINDOWS).stdout.splitlines()


def test_the_qube_screen_is_the_user_screen(bulkhead, desktop):
    # The qubes started before qvm-start-daemon: their X began at a default size and
    # took the display's when dom0's GUI daemon said it.
    display, _, _ = desktop
    want = "screen %dx%d" % SCREEN
    assert SCREEN != (1920, 1080)   # not the agent's default: the test could not fail
    for q in ("work", "personal"):
        display.wait_for(lambda: want in in_qube_x(bulkhead, q), 30, f"{q}'s screen at {want}")


def test_moving_and_resizing_in_dom0_reaches_the_qube(bulkhead, desktop):
    display, _, _ = desktop
    bulkhead.run("work", "pkill xterm; true")
    display.wait_for(lambda: not display.windows("[work]"), 30, "old windows to go")
    proc = open_xterm(bulkhead, "work", "/tmp/m")
    try:
        w = display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")[0]
        display.wait_for(lambda: any(line.startswith("xterm ") for line in in_qube_x(bulkhead, "work")),
                         30, "work's xterm")
        before = [line for line in in_qube_x(bulkhead, "work") if line.startswith("xterm ")]
        display.xdotool("windowsize", str(w.id), "520", "330")
        display.xdotool("windowmove", str(w.id), "300", "200")
        # dom0's frame is BORDER (4) pixels around the qube's window.
        want = "xterm 304 204 512 322"
        assert want not in before
        display.wait_for(lambda: want in in_qube_x(bulkhead, "work"), 30,
                         f"the qube's window at {want} (was {before})")
        # ...and the qube's answer (its ConfigureNotify) leaves dom0's frame where the user put it.
        time.sleep(1)
        assert display.geometry(w) == (300, 200, 520, 330)
    finally:
        proc.kill()


def test_keys_follow_the_user_keyboard_layout(bulkhead, desktop):
    display, logs, _ = desktop
    bulkhead.run("work", "pkill xterm; true")
    display.wait_for(lambda: not display.windows("[work]"), 30, "old windows to go")
    # German: the keys y/z swap, and - and # sit where US has / and \.  A qube still on
    # US would write "yz/\".
    subprocess.run(["setxkbmap", "-display", display.name, "de"], check=True, timeout=30)
    try:
        display.wait_for(lambda: "keyboard layout evdev,pc105,de,," in
                         (logs / "guid.work.log").read_text(), 30, "dom0 to tell work the layout")
        display.wait_for(lambda: "layout:     de" in bulkhead.run(
            "work", "DISPLAY=:0 setxkbmap -query").stdout, 60, "work's X server in German")
        proc = open_xterm(bulkhead, "work", "/tmp/typed")
        try:
            w = display.wait_for(lambda: display.windows("[work]"), 120, "a [work] window")[0]
            time.sleep(2)   # xterm ready to read its keyboard
            display.xdotool("windowfocus", "--sync", str(w.id))
            display.xdotool("type", "--delay", "30", "zy-#")
            display.xdotool("key", "Return")
            display.wait_for(lambda: read_file(bulkhead, "work", "/tmp/typed").endswith("\n"), 30,
                             "typed text in work")
            assert read_file(bulkhead, "work", "/tmp/typed") == "zy-#\n"
        finally:
            proc.kill()
    finally:
        subprocess.run(["setxkbmap", "-display", display.name, "us"], check=True, timeout=30)
    display.wait_for(lambda: "layout:     us" in bulkhead.run(
        "work", "DISPLAY=:0 setxkbmap -query").stdout, 60, "work's X server back in US")


ECHO_SERVICE = "#!/bin/sh\necho \"from=$QREXEC_REMOTE_DOMAIN\"\ncat\n"


def test_qrexec_ask_is_a_dialog_on_the_display(bulkhead, desktop):
    import threading
    display, _, _ = desktop
    policy = bulkhead.home / "policy.d"
    policy.mkdir(exist_ok=True)
    (policy / "10-gui-ask.policy").write_text("test.GuiAsk * work personal ask\n"
                                              "test.GuiAsk * @anyvm @anyvm deny\n")
    bulkhead.run("personal", "mkdir -p /usr/local/etc/qubes-rpc && "
                             "cat > /usr/local/etc/qubes-rpc/test.GuiAsk && "
                             "chmod +x /usr/local/etc/qubes-rpc/test.GuiAsk",
                 user="root", input=ECHO_SERVICE)

    def call() -> dict[str, str]:
        result: dict[str, str] = {}

        def run() -> None:
            result["out"] = bulkhead.run(
                "work", "echo hello | qrexec-client-vm personal test.GuiAsk; echo rc=$?",
                check=False).stdout
        t = threading.Thread(target=run, daemon=True)
        t.start()
        result["thread"] = t  # type: ignore[assignment]
        return result

    def answer(key: str) -> None:
        dialog = display.wait_for(lambda: display.windows("Bulkhead: qrexec call"), 60,
                                  "the ask dialog")[0]
        display.xdotool("windowfocus", "--sync", str(dialog.id))
        display.xdotool("key", key)
        display.wait_for(lambda: not display.windows("Bulkhead: qrexec call"), 30,
                         "the dialog to close")

    try:
        allowed = call()
        answer("Return")
        allowed["thread"].join(120)  # type: ignore[attr-defined]
        assert allowed.get("out") == "from=work\nhello\nrc=0\n", allowed
        refused = call()
        answer("Escape")
        refused["thread"].join(120)  # type: ignore[attr-defined]
        assert refused.get("out", "").endswith("rc=126\n"), refused
        lines = [line for line in (bulkhead.home / "log" / "qrexec.log").read_text().splitlines()
                 if "ask source=work target=personal service=test.GuiAsk" in line]
        assert [line.rsplit(" ", 1)[1] for line in lines[-2:]] == ["answer=personal", "answer=deny"]
    finally:
        (policy / "10-gui-ask.policy").unlink(missing_ok=True)


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
