"""A question drawn by dom0 on the user's display: the paste confirmation, qrexec's ``ask``.

``python -m bulkhead.gui.dialog --title T LINE... [--choice NAME...]`` shows
the lines (already sanitised by the caller: printable text only) and waits:
Enter (or a click on the dialog's upper half) answers yes, Escape (or the lower
half) no; with choices, the Up/Down keys pick one, printed on stdout.  Exit
status 0 for yes, 1 for no or no answer within :data:`DIALOG_TIMEOUT`.
A process of its own, so a GUI daemon's loop is not entangled with it.
"""

from __future__ import annotations

import argparse
import sys
import time

DIALOG_TIMEOUT = 60.0
LINE_HEIGHT = 16


def ask(title: str, lines: list[str], choices: list[str] | None = None,
        timeout: float = DIALOG_TIMEOUT) -> tuple[bool, str | None]:
    from Xlib import X, XK, display  # noqa: PLC0415
    d = display.Display()
    s = d.screen()
    choices = choices or []
    pick = 0
    width = max(300, 8 + 6 * max(len(t) for t in lines + [title] + choices))
    height = LINE_HEIGHT * (len(lines) + len(choices) + 1) + 16
    g = s.root.get_geometry()
    w = s.root.create_window((g.width - width) // 2, (g.height - height) // 3, width, height, 2,
                             s.root_depth, background_pixel=s.white_pixel,
                             border_pixel=s.black_pixel,
                             event_mask=X.ExposureMask | X.KeyPressMask | X.ButtonPressMask
                             | X.StructureNotifyMask)
    w.set_wm_name(title.encode("latin-1", "replace"))
    w.set_wm_class("bulkhead-dialog", "Bulkhead-dialog")
    w.map()
    gc = w.create_gc(foreground=s.black_pixel, background=s.white_pixel)

    def draw() -> None:
        w.clear_area()
        y = LINE_HEIGHT
        for text in [title] + lines:
            w.draw_text(gc, 8, y, text.encode("latin-1", "replace"))
            y += LINE_HEIGHT
        for i, c in enumerate(choices):
            w.draw_text(gc, 8, y, (("> " if i == pick else "  ") + c).encode("latin-1", "replace"))
            y += LINE_HEIGHT
        d.flush()

    deadline = time.monotonic() + timeout
    focused = False
    try:
        while time.monotonic() < deadline:
            while d.pending_events():
                e = d.next_event()
                if e.type == X.MapNotify and not focused:
                    w.set_input_focus(X.RevertToParent, X.CurrentTime)
                    focused = True
                    draw()
                elif e.type == X.Expose:
                    draw()
                elif e.type == X.KeyPress:
                    sym = d.keycode_to_keysym(e.detail, 0)
                    if sym in (XK.XK_Return, XK.XK_KP_Enter):
                        return True, choices[pick] if choices else None
                    if sym == XK.XK_Escape:
                        return False, None
                    if choices and sym in (XK.XK_Up, XK.XK_Down):
                        pick = (pick + (1 if sym == XK.XK_Down else -1)) % len(choices)
                        draw()
                elif e.type == X.ButtonPress:
                    yes = e.event_y < height // 2
                    return yes, (choices[pick] if choices and yes else None)
            time.sleep(0.02)
        return False, None
    finally:
        w.destroy()
        d.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bulkhead-dialog")
    ap.add_argument("--title", required=True)
    ap.add_argument("--choice", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=DIALOG_TIMEOUT)
    ap.add_argument("lines", nargs="*")
    args = ap.parse_args(argv)
    yes, choice = ask(args.title, args.lines, args.choice, args.timeout)
    if yes and choice:
        print(choice)
    return 0 if yes else 1


if __name__ == "__main__":
    sys.exit(main())
