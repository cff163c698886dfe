"""The seamless GUI's speed, measured in one run on real qubes under this machine's emulation.

Prints, each beside its goal (issue 10):
- key press to updated pixels on the user's display: median and p90 (goal <= 20 ms under TCG),
  an XTEST key on the user's display -> dom0's GUI daemon -> the qube's xterm -> its
  pixels back on the display, seen through the display's DAMAGE events (not polled:
  a polling loop took a CPU from the qube's emulation on this 2-core machine), and
  beside it the same key inside the qube alone (its xterm's echo, no GUI path): the
  share of the latency that is the emulated qube's own;
- frames per second of a full redraw of an 800x600 window (goal >= 30): a client in
  the qube repaints the whole window as fast as it can; dom0's GUI daemon counts the
  pixels it put on the display (800*600 of them make one frame);
- dom0's CPU per frame: the GUI daemon's own CPU time over those frames.

    PYTHONPATH=src python bench/gui.py
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))
from common import BenchInstance  # noqa: E402
from gui_helpers import UserDisplay, start_daemon, stop  # noqa: E402

# The same key inside the qube, without the GUI path: XTEST on the qube's own X server,
# the qube's xterm (and its shell's echo) drawing, DAMAGE on the xterm.  What the
# emulated qube costs by itself, apart from the path to and from dom0.
IN_QUBE = r'''
import select, sys, time
sys.path[:0] = ["/usr/lib/python3/dist-packages"]
from Xlib import display, X, XK
from Xlib.ext import damage, xtest
d = display.Display(":0")
xt = [w for w in d.screen().root.query_tree().children
      if (w.get_wm_class() or ("", ""))[1] == "XTerm"][0]
d.damage_query_version()
notify = d.query_extension("DAMAGE").first_event + damage.DamageNotifyCode
dmg = xt.damage_create(damage.DamageReportNonEmpty)
xt.set_input_focus(X.RevertToParent, X.CurrentTime)
kc = d.keysym_to_keycode(XK.string_to_keysym("a"))
for i in range(int(sys.argv[1]) + 3):
    time.sleep(0.15)
    d.damage_subtract(dmg)
    d.sync()
    while d.pending_events():
        d.next_event()
    t0 = time.perf_counter()
    xtest.fake_input(d, X.KeyPress, kc)
    xtest.fake_input(d, X.KeyRelease, kc)
    d.flush()
    drawn = False
    while not drawn and time.perf_counter() - t0 < 2:
        if not d.pending_events():
            select.select([d.fileno()], [], [], 0.05)
        while d.pending_events():
            drawn = d.next_event().type == notify or drawn
    if i >= 3:
        print("%.2f" % ((time.perf_counter() - t0) * 1000))
'''

REDRAW = r'''
import sys, time
sys.path[:0] = ["/usr/lib/python3/dist-packages"]
from Xlib import display, X
d = display.Display()
s = d.screen()
w = s.root.create_window(100, 100, 800, 600, 0, s.root_depth, background_pixel=0)
w.set_wm_name("redraw")
w.map()
d.sync()
time.sleep(3)
gc = w.create_gc()
end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    gc.change(foreground=(i * 0x10101) & 0xFFFFFF)
    w.fill_rectangle(gc, 0, 0, 800, 600)
    d.sync()
    i += 1
print(i)
'''


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def key_latencies(display: UserDisplay, w: object, keys: int) -> list[float]:
    """Milliseconds from an XTEST key press on the display to the first change of the
    window's pixels there.  The display's DAMAGE extension says when dom0's GUI daemon
    drew into the window; only then are its pixels read and compared (a busy loop of
    full-window GetImages would take the CPU the qube's emulation needs, and time
    itself as much as the path it measures)."""
    import select

    from Xlib import X, XK
    from Xlib.ext import damage, xtest
    d = display.d
    d.damage_query_version()
    damage_event = d.query_extension("DAMAGE").first_event + damage.DamageNotifyCode
    content = w.query_tree().children[0]   # the qube's pixels, inside dom0's frame
    g = content.get_geometry()
    dmg = content.damage_create(damage.DamageReportNonEmpty)
    keycode = d.keysym_to_keycode(XK.string_to_keysym("a"))

    def pixels() -> bytes:
        return content.get_image(0, 0, g.width, g.height, X.ZPixmap, 0xFFFFFFFF).data

    def drain() -> bool:
        """True if the window was drawn into since the last call."""
        drawn = False
        while d.pending_events():
            if d.next_event().type == damage_event:
                drawn = True
        if drawn:
            d.damage_subtract(dmg)   # re-arm: NonEmpty reports once until then
            d.flush()
        return drawn

    latencies = []
    for i in range(keys + 3):
        time.sleep(0.15)
        drain()
        before = pixels()
        t0 = time.perf_counter()
        xtest.fake_input(d, X.KeyPress, keycode)
        xtest.fake_input(d, X.KeyRelease, keycode)
        d.flush()
        while time.perf_counter() - t0 < 2:
            if not d.pending_events():   # python-xlib may hold events read with a reply
                select.select([d.fileno()], [], [], 0.05)
            if drain() and pixels() != before:
                break
        dt = (time.perf_counter() - t0) * 1000
        if i >= 3:            # warm-up keys not counted
            latencies.append(dt)
    d.damage_destroy(dmg)
    return latencies


def stats_line(log: Path) -> tuple[int, float] | None:
    last = None
    for m in re.finditer(r"stats: updates=(\d+) pixels=(\d+) cpu=([\d.]+)", log.read_text()):
        last = (int(m.group(2)), float(m.group(3)))
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    inst = BenchInstance("gui", default_qubes=True,
                         env={"BULKHEAD_GUID_STATS": "1"})
    display = UserDisplay(150 + os.getpid() % 50)
    logs = inst.home / "gui-logs"
    daemon = None
    try:
        inst.tool("qvm-features", "work", "gui", "1")
        inst.tool("qvm-start", "work")
        daemon = start_daemon(display, inst.env, logs, "work")
        subprocess.run(["qvm-run", "-p", "work", "for i in $(seq 900); do [ -e /tmp/.X11-unix/X0 ]"
                        " && exit 0; sleep 0.2; done; exit 1"], env=inst.env, check=True)
        xterm = subprocess.Popen(["qvm-run", "work", "xterm -geometry 80x24+20+20"], env=inst.env)
        w = display.wait_for(lambda: display.windows("[work]"), 180, "the xterm")[0]
        time.sleep(3)
        display.xdotool("windowfocus", "--sync", str(w.id))
        latencies = key_latencies(display, w, args.keys)
        subprocess.run(["qvm-run", "-p", "work", "cat > /tmp/in_qube.py"], input=IN_QUBE.encode(),
                       env=inst.env, check=True)
        in_qube = [float(v) for v in subprocess.run(
            ["qvm-run", "-p", "work", f"python3 /tmp/in_qube.py {args.keys}"], env=inst.env,
            check=True, capture_output=True, text=True).stdout.split()]
        xterm.kill()
        subprocess.run(["qvm-run", "-p", "work", "cat > /tmp/redraw.py"], input=REDRAW.encode(),
                       env=inst.env, check=True)
        log = logs / "guid.work.log"
        redraw = subprocess.Popen(["qvm-run", "-p", "work", f"python3 /tmp/redraw.py {args.seconds}"],
                                  env=inst.env, stdout=subprocess.PIPE, text=True)
        display.wait_for(lambda: display.windows("[work] redraw"), 120, "the redraw window")
        time.sleep(3.5)   # the client waits 3 s before it starts
        first = stats_line(log)
        t_first = time.monotonic()
        time.sleep(args.seconds - 2)
        last = stats_line(log)
        elapsed = time.monotonic() - t_first
        client_frames = int(redraw.communicate(timeout=120)[0].strip() or 0)
        frames = (last[0] - first[0]) / (800 * 600)
        fps = frames / elapsed
        cpu_ms = (last[1] - first[1]) / frames * 1000 if frames else float("nan")
        med, p90 = statistics.median(latencies), pct(latencies, 0.9)
        print(f"key press to updated pixels ({len(latencies)} keys): median {med:.1f} ms, "
              f"p90 {p90:.1f} ms  (goal <= 20 ms: {'met' if p90 <= 20 else 'NOT met'})")
        print(f"  of which inside the qube alone (XTEST -> xterm's echo -> DAMAGE there, no GUI "
              f"path): median {statistics.median(in_qube):.1f} ms, p90 {pct(in_qube, 0.9):.1f} ms")
        print(f"full redraw of an 800x600 window: {fps:.1f} frames/s on the display "
              f"(the qube's client drew {client_frames / args.seconds:.1f}/s)  "
              f"(goal >= 30: {'met' if fps >= 30 else 'NOT met'})")
        print(f"dom0 CPU per frame (the qube's GUI daemon): {cpu_ms:.1f} ms")
    finally:
        if daemon is not None:
            stop(daemon)
        display.close()
        inst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
