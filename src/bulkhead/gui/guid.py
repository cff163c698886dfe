"""One qube's GUI daemon in dom0 (Qubes' ``qubes-guid``): its windows on the user's display.

``qvm-start-daemon`` runs one of these per running qube with the ``gui``
feature, as the desktop user.  It gets the qube's GUI port from the Bulkhead
daemon (``bulkhead.vm.gui.Connect``: the connected socket itself, passed over
the Admin API socket), then:

- draws each qube window as a window of its own on the user's display, inside
  a frame of the qube's label colour (:data:`BORDER` pixels, drawn by dom0: the
  qube's pixels go in a child window and cannot cover it), titled
  ``[qube] title``, ``WM_CLASS`` ``qube:class``;
- sends back the keys, buttons and motion its windows receive (a qube gets
  input only through its own windows: X delivers keys to the focused window
  alone), the moves and resizes the user makes, and WM_DELETE_WINDOW;
- Ctrl+Shift+C copies the qube's clipboard into dom0's global clipboard,
  Ctrl+Shift+V pastes it (once) into this qube, after the ``qubes.ClipboardPaste``
  policy and, if asked for, the user's confirmation.

Every message from the qube goes through :class:`bulkhead.gui.validate.GuestState`;
the first violation closes the connection, is logged, and this process exits
with :data:`EXIT_VIOLATION` (its windows go with its X connection).  Nothing
else is touched: other qubes have processes of their own.

One process a qube, synchronous (python-xlib is), a ``selectors`` loop over
two descriptors: the qube's socket and the X connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..guest import gui_protocol as G
from .clipboard import KIND_NAMES, GlobalClipboard
from .validate import (Classed, Clipboard, Configured, Created, Destroyed, GuestState, Hello,
                       Mapped, Pixels, Titled, Unmapped, Violation, sanitize_title)

log = logging.getLogger("bulkhead.guid")

BORDER = 4                 # pixels of label colour around every qube window
RECV_CHUNK = 1 << 20
MAX_OUT = G.CLIPBOARD_MAX + 256 * 1024   # to the qube, unread: past this it is not reading
EXIT_VIOLATION = 3
NOTIFY_SECONDS = 3.0


@dataclass
class DomWindow:
    wid: int
    frame: Any
    content: Any
    pixmap: Any
    x: int
    y: int
    w: int
    h: int
    override_redirect: bool
    mapped: bool = False
    sent_geometry: tuple[int, int, int, int] = (0, 0, 0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_color(color: str) -> int:
    """A label colour as admin.label.Get gives it (``0xRRGGBB``)."""
    value = int(color, 16)
    if not 0 <= value <= 0xFFFFFF:
        raise ValueError(color)
    return value


class Guid:
    def __init__(self, qube: str, sock: socket.socket, display: Any, color: int,
                 clipboard: GlobalClipboard | None = None, confirm_paste: bool = False,
                 paste_allowed: Callable[[str, str], bool] | None = None) -> None:
        from Xlib import X, Xatom  # noqa: PLC0415
        self.X, self.Xatom = X, Xatom
        self.qube = qube
        self.sock = sock
        self.d = display
        self.color = color
        self.clipboard = clipboard or GlobalClipboard()
        self.confirm_paste = confirm_paste
        self.paste_allowed = paste_allowed
        self.state = GuestState()
        self.reader = G.Reader(G.FROM_GUEST)
        self.out = bytearray()
        self.windows: dict[int, DomWindow] = {}
        self.by_xid: dict[int, DomWindow] = {}
        self.screen = display.screen()
        self.root = self.screen.root
        self.gc = self.root.create_gc()
        self.atoms = {n: display.intern_atom(n) for n in (
            "WM_PROTOCOLS", "WM_DELETE_WINDOW", "_NET_WM_NAME", "UTF8_STRING", "_QUBES_VMNAME",
            "_QUBES_LABEL_COLOR", "_XKB_RULES_NAMES")}
        self.pixel = self._alloc(color)
        self.max_put = (display.display.info.max_request_length * 4) - 64
        self.notice: Any = None
        self.notice_until = 0.0
        self.frames_drawn = 0
        self.pixels_drawn = 0          # for bench/gui.py (BULKHEAD_GUID_STATS)
        self.stats_every = float(os.environ.get("BULKHEAD_GUID_STATS", "0") or 0)
        self.stats_next = time.monotonic() + self.stats_every
        sock.setblocking(False)
        g = self.root.get_geometry()
        self.send(G.D_HELLO, 0, G.D_HELLO_S.pack(G.VERSION, g.width, g.height))
        self.keymap: tuple[str, ...] | None = None
        # The user's layout follows the root's _XKB_RULES_NAMES (setxkbmap, a desktop's
        # layout switcher rewrite it): watch it, and tell the qube each change.
        self.root.change_attributes(event_mask=self.X.PropertyChangeMask)
        self.send_keymap()

    def _alloc(self, rgb: int) -> int:
        c = self.screen.default_colormap.alloc_color(((rgb >> 16) & 255) * 257,
                                                      ((rgb >> 8) & 255) * 257, (rgb & 255) * 257)
        return c.pixel

    # --- to the qube ------------------------------------------------------------
    def send(self, mtype: int, wid: int, payload: bytes = b"") -> None:
        self.out += G.pack(mtype, wid, payload)
        if len(self.out) > MAX_OUT:
            raise Violation("the qube does not read its GUI input")
        self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return
            del self.out[:n]

    def user_keymap(self) -> tuple[str, ...] | None:
        """The user's XKB names (rules, model, layout, variant, options), None if unknown."""
        try:
            prop = self.root.get_full_property(self.atoms["_XKB_RULES_NAMES"],
                                               self.Xatom.STRING, 1024)
        except Exception:  # noqa: BLE001 -- no such property: a server without XKB
            prop = None
        if prop is None or prop.format != 8:
            return None
        raw = prop.value if isinstance(prop.value, bytes) else str(prop.value).encode("latin-1")
        names = raw.decode("latin-1").split("\0")
        names = (names + [""] * 5)[:5]
        try:
            return G.check_keymap_names(names)
        except Violation as e:
            # Another client on the user's display may have written anything there.
            log.warning("qube %s: the display's keyboard layout is not passed on: %s", self.qube, e)
            return None

    def send_keymap(self) -> None:
        names = self.user_keymap()
        if names is not None and names != self.keymap:
            self.keymap = names
            self.send(G.D_KEYMAP, 0, G.pack_keymap(names))
            log.info("qube %s: keyboard layout %s", self.qube, ",".join(names))

    # --- from the qube ----------------------------------------------------------
    def receive(self) -> bool:
        """Read and apply what the qube sent; False when it hung up."""
        try:
            untrusted_data = self.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not untrusted_data:
            return False
        for mtype, wid, untrusted_payload in self.reader.feed(untrusted_data):
            self.apply(self.state.handle(mtype, wid, untrusted_payload))
        return True

    def apply(self, ev: Any) -> None:
        if isinstance(ev, Hello):
            return
        if isinstance(ev, Created):
            self.create(ev.window)
        elif isinstance(ev, Destroyed):
            win = self.windows.pop(ev.wid)
            self.by_xid.pop(win.frame.id, None)
            self.by_xid.pop(win.content.id, None)
            win.frame.destroy()
            win.pixmap.free()
        elif isinstance(ev, Configured):
            self.configure(self.windows[ev.wid], ev.x, ev.y, ev.w, ev.h)
        elif isinstance(ev, Mapped):
            win = self.windows[ev.wid]
            win.mapped = True
            win.frame.map()
        elif isinstance(ev, Unmapped):
            win = self.windows[ev.wid]
            win.mapped = False
            win.frame.unmap()
        elif isinstance(ev, Titled):
            self.set_title(self.windows[ev.wid], ev.title)
        elif isinstance(ev, Classed):
            name = f"{self.qube}:{ev.wm_class or 'unknown'}"
            self.windows[ev.wid].frame.set_wm_class(name, name)
        elif isinstance(ev, Pixels):
            self.draw(self.windows[ev.wid], ev)
        elif isinstance(ev, Clipboard):
            self.copied(ev)

    def create(self, w: Any) -> None:
        X = self.X
        depth = self.screen.root_depth
        fx, fy = w.x - BORDER, w.y - BORDER
        frame = self.root.create_window(
            fx, fy, w.w + 2 * BORDER, w.h + 2 * BORDER, 0, depth, X.InputOutput, X.CopyFromParent,
            background_pixel=self.pixel, override_redirect=w.override_redirect,
            event_mask=(X.StructureNotifyMask | X.KeyPressMask | X.KeyReleaseMask
                        | X.FocusChangeMask))
        content = frame.create_window(
            BORDER, BORDER, w.w, w.h, 0, depth, X.InputOutput, X.CopyFromParent,
            background_pixel=0,
            event_mask=(X.ExposureMask | X.ButtonPressMask | X.ButtonReleaseMask
                        | X.PointerMotionMask))
        content.map()   # shown with its frame
        pixmap = self.root.create_pixmap(w.w, w.h, depth)
        pixmap.fill_rectangle(self.gc, 0, 0, w.w, w.h)
        frame.set_wm_protocols([self.atoms["WM_DELETE_WINDOW"]])
        frame.set_wm_normal_hints(flags=1 | 4, x=fx, y=fy)  # USPosition | PPosition: the qube's place
        frame.change_property(self.atoms["_QUBES_VMNAME"], self.Xatom.STRING, 8, self.qube.encode())
        frame.change_property(self.atoms["_QUBES_LABEL_COLOR"], self.Xatom.CARDINAL, 32, [self.color])
        name = f"{self.qube}:unknown"
        frame.set_wm_class(name, name)
        win = DomWindow(w.wid, frame, content, pixmap, w.x, w.y, w.w, w.h, w.override_redirect,
                        sent_geometry=(w.x, w.y, w.w, w.h))
        self.windows[w.wid] = win
        self.by_xid[frame.id] = win
        self.by_xid[content.id] = win
        self.set_title(win, "")

    def set_title(self, win: DomWindow, title: str) -> None:
        full = f"[{self.qube}] {title}"
        win.frame.set_wm_name(full.encode("latin-1", "replace"))
        win.frame.change_property(self.atoms["_NET_WM_NAME"], self.atoms["UTF8_STRING"], 8,
                                  full.encode("utf-8"))

    def configure(self, win: DomWindow, x: int, y: int, w: int, h: int) -> None:
        if (w, h) != (win.w, win.h):
            old = win.pixmap
            win.pixmap = self.root.create_pixmap(w, h, self.screen.root_depth)
            win.pixmap.fill_rectangle(self.gc, 0, 0, w, h)
            win.pixmap.copy_area(self.gc, old, 0, 0, min(w, win.w), min(h, win.h), 0, 0)
            old.free()
        win.x, win.y, win.w, win.h = x, y, w, h
        win.sent_geometry = (x, y, w, h)
        win.frame.configure(x=x - BORDER, y=y - BORDER, width=w + 2 * BORDER, height=h + 2 * BORDER)
        win.content.configure(width=w, height=h)

    def draw(self, win: DomWindow, p: Pixels) -> None:
        X = self.X
        stride = p.w * 4
        rows = max(1, self.max_put // stride)
        for row in range(0, p.h, rows):
            n = min(rows, p.h - row)
            win.pixmap.put_image(self.gc, p.x, p.y + row, p.w, n, X.ZPixmap,
                                 self.screen.root_depth, 0, bytes(p.data[row * stride:(row + n) * stride]))
        win.content.copy_area(self.gc, win.pixmap, p.x, p.y, p.w, p.h, p.x, p.y)
        self.frames_drawn += 1
        self.pixels_drawn += p.w * p.h

    # --- from the user's display -------------------------------------------------
    def x_events(self) -> None:
        X = self.X
        motion: tuple[DomWindow, Any] | None = None
        while self.d.pending_events():
            ev = self.d.next_event()
            if ev.type == X.PropertyNotify and ev.window.id == self.root.id:
                if ev.atom == self.atoms["_XKB_RULES_NAMES"]:
                    self.send_keymap()
                continue
            win = self.by_xid.get(getattr(ev, "window", None).id
                                  if getattr(ev, "window", None) is not None else -1)
            if win is None:
                continue
            t = ev.type
            if t == X.MotionNotify:
                motion = (win, ev)
                continue
            if motion is not None:
                self.send_motion(*motion)
                motion = None
            if t in (X.KeyPress, X.KeyRelease):
                self.key(win, ev)
            elif t in (X.ButtonPress, X.ButtonRelease):
                if t == X.ButtonPress and not win.override_redirect:
                    win.frame.set_input_focus(X.RevertToParent, X.CurrentTime)
                self.send(G.D_BUTTON, win.wid, G.BUTTON.pack(
                    ev.event_x, ev.event_y, ev.detail, int(t == X.ButtonPress), ev.state & 0xFFFF))
            elif t == X.Expose:
                win.content.copy_area(self.gc, win.pixmap, ev.x, ev.y, ev.width, ev.height,
                                      ev.x, ev.y)
            elif t in (X.FocusIn, X.FocusOut):
                if ev.detail not in (X.NotifyPointer, X.NotifyInferior):
                    self.send(G.D_FOCUS, win.wid, G.U32.pack(int(t == X.FocusIn)))
            elif t == X.ConfigureNotify and ev.window.id == win.frame.id:
                self.user_configured(win, ev)
            elif t == X.ClientMessage and ev.client_type == self.atoms["WM_PROTOCOLS"]:
                if ev.data[1][0] == self.atoms["WM_DELETE_WINDOW"]:
                    self.send(G.D_CLOSE, win.wid)
        if motion is not None:
            self.send_motion(*motion)

    def send_motion(self, win: DomWindow, ev: Any) -> None:
        self.send(G.D_MOTION, win.wid, G.MOTION.pack(ev.event_x, ev.event_y, ev.state & 0xFFFF))

    def key(self, win: DomWindow, ev: Any) -> None:
        X = self.X
        from Xlib import XK  # noqa: PLC0415
        keysym = self.d.keycode_to_keysym(ev.detail, 0)
        shortcut = (ev.state & X.ControlMask) and (ev.state & X.ShiftMask) and \
            keysym in (XK.XK_c, XK.XK_v)
        if shortcut:
            if ev.type == X.KeyPress:
                if keysym == XK.XK_c:
                    self.state.clipboard_wanted = True
                    self.send(G.D_CLIP_REQUEST, 0)
                else:
                    self.paste()
            return   # the shortcut is dom0's: the qube sees neither its press nor its release
        self.send(G.D_KEY, win.wid, G.KEY.pack(ev.detail, int(ev.type == X.KeyPress),
                                               ev.state & 0xFFFF))

    def user_configured(self, win: DomWindow, ev: Any) -> None:
        # The frame's position on the root (a reparenting window manager puts it in its own).
        pos = win.frame.translate_coords(self.root, 0, 0)
        x, y = -pos.x + BORDER, -pos.y + BORDER
        w, h = max(1, ev.width - 2 * BORDER), max(1, ev.height - 2 * BORDER)
        if (w, h) != (win.w, win.h):
            win.content.configure(width=w, height=h)
        geometry = (x, y, min(w, G.MAX_DIM), min(h, G.MAX_DIM))
        if geometry != win.sent_geometry and not win.override_redirect:
            win.sent_geometry = geometry
            self.send(G.D_CONFIGURE, win.wid, G.GEOMETRY.pack(*geometry))

    # --- clipboard --------------------------------------------------------------------
    def copied(self, clip: Clipboard) -> None:
        self.clipboard.put(self.qube, clip.kind, clip.data)
        log.info("qube %s: copied %d bytes (%s) to the global clipboard", self.qube,
                 len(clip.data), KIND_NAMES[clip.kind])
        self.notify(f"Copied {len(clip.data)} bytes ({KIND_NAMES[clip.kind]}) from "
                    f"{self.qube} to the global clipboard")

    def paste(self) -> None:
        entry = self.clipboard.peek()
        if entry is None:
            self.notify("The global clipboard is empty")
            return
        if self.paste_allowed is not None and not self.paste_allowed(entry.source, self.qube):
            log.info("qube %s: paste from %s refused by the qubes.ClipboardPaste policy",
                     self.qube, entry.source)
            self.notify(f"Paste from {entry.source} into {self.qube} refused by policy")
            return
        if self.confirm_paste and not confirm_dialog(entry, self.qube):
            log.info("qube %s: paste from %s refused by the user", self.qube, entry.source)
            return
        entry = self.clipboard.take()
        if entry is None:
            return
        self.send(G.D_CLIP_DATA, 0, bytes([entry.kind]) + entry.data)
        log.info("qube %s: pasted %d bytes from %s", self.qube, len(entry.data), entry.source)
        self.notify(f"Pasted {len(entry.data)} bytes from {entry.source} into {self.qube}")

    def notify(self, text: str) -> None:
        """A notice drawn by dom0 in the screen's corner, gone after a few seconds."""
        X = self.X
        if self.notice is not None:
            self.notice.destroy()
        g = self.root.get_geometry()
        width = min(g.width, 8 + 6 * len(text))
        self.notice = self.root.create_window(g.width - width - 10, 10, width, 24, 1,
                                              self.screen.root_depth, X.InputOutput,
                                              X.CopyFromParent, background_pixel=self.screen.white_pixel,
                                              border_pixel=self.pixel, override_redirect=True,
                                              event_mask=X.ExposureMask)
        self.notice.set_wm_name("Bulkhead notice")
        self.notice.map()
        gc = self.notice.create_gc(foreground=self.screen.black_pixel)
        self.d.sync()
        self.notice.draw_text(gc, 4, 16, text.encode("latin-1", "replace"))
        self.notice_until = time.monotonic() + NOTIFY_SECONDS

    def expire_notice(self) -> None:
        if self.notice is not None and time.monotonic() > self.notice_until:
            self.notice.destroy()
            self.notice = None

    # --- the loop --------------------------------------------------------------------
    def run(self) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "qube")
        sel.register(self.d.fileno(), selectors.EVENT_READ, "x")
        try:
            while True:
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
                sel.modify(self.sock, want, "qube")
                timeout = 0.5 if self.notice is not None or self.stats_every else None
                for key, mask in sel.select(timeout if not self.d.pending_events() else 0):
                    if key.data == "qube":
                        if mask & selectors.EVENT_WRITE:
                            self.flush()
                        if mask & selectors.EVENT_READ and not self.receive():
                            log.info("qube %s: GUI connection closed by the qube's side", self.qube)
                            return 0
                self.x_events()
                self.expire_notice()
                if self.stats_every and time.monotonic() >= self.stats_next:
                    self.stats_next += self.stats_every
                    t = os.times()
                    log.info("stats: updates=%d pixels=%d cpu=%.3f", self.frames_drawn,
                             self.pixels_drawn, t.user + t.system)
                self.d.flush()
        except Violation as e:
            log.error("qube %s: GUI protocol violation: %s; closing its GUI connection",
                      self.qube, e)
            return EXIT_VIOLATION
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


def confirm_dialog(entry: Any, target: str) -> bool:
    """Ask the user before a paste (source, target, size, a text preview); False if refused."""
    from .dialog import DIALOG_TIMEOUT  # noqa: PLC0415
    if entry.kind == G.CLIP_TEXT:
        preview = sanitize_title(entry.data[:400])[:60]
    else:
        preview = f"({KIND_NAMES[entry.kind]})"
    lines = [f"Paste {len(entry.data)} bytes from {entry.source} into {target}?",
             f"Preview: {preview}", "Enter: paste    Escape: cancel"]
    r = subprocess.run([sys.executable, "-m", "bulkhead.gui.dialog", "--title",
                        "Bulkhead: paste?", *lines], timeout=DIALOG_TIMEOUT + 5, check=False)
    return r.returncode == 0


def connect(qube: str, socket_path: str | None = None) -> socket.socket:
    """The qube's GUI port, from the daemon (``bulkhead.vm.gui.Connect``)."""
    from ..client.connection import Connection  # noqa: PLC0415
    from ..client import wire  # noqa: PLC0415
    conn = Connection(socket_path)
    s = conn.open_stream(wire.encode_header("bulkhead.vm.gui.Connect", qube), shutdown_write=True)
    s.settimeout(30)
    msg, fds, _flags, _addr = socket.recv_fds(s, 4096, 1)
    rest = msg
    while fds == [] and rest:
        more = s.recv(4096)
        if not more:
            break
        rest += more
    s.close()
    if not fds:
        raise ConnectionError(f"the daemon gave no GUI connection for {qube}: "
                              + wire_error(rest))
    return socket.socket(fileno=fds[0])


def wire_error(reply: bytes) -> str:
    parts = reply.split(b"\0")
    if parts and parts[0] == b"2" and len(parts) >= 4:
        return parts[3].decode("utf-8", "replace")
    return repr(reply[:200])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bulkhead-guid", description="one qube's GUI daemon")
    ap.add_argument("qube")
    ap.add_argument("--color", help="label colour 0xRRGGBB (default: ask the daemon)")
    ap.add_argument("--confirm-paste", action="store_true")
    ap.add_argument("--clipboard-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from pathlib import Path  # noqa: PLC0415

    from Xlib import display as xdisplay  # noqa: PLC0415
    color = args.color
    policy = None
    if color is None:
        from ..client.app import App  # noqa: PLC0415
        app = App()
        color = app.domains[args.qube].label.color
        from .policy import paste_policy  # noqa: PLC0415
        policy = paste_policy(app)
    try:
        sock = connect(args.qube)
    except (OSError, ConnectionError) as e:
        log.error("qube %s: %s", args.qube, e)
        return 1
    d = xdisplay.Display()
    guid = Guid(args.qube, sock, d, parse_color(color),
                GlobalClipboard(Path(args.clipboard_dir) if args.clipboard_dir else None),
                confirm_paste=args.confirm_paste, paste_allowed=policy)
    return guid.run()


if __name__ == "__main__":
    sys.exit(main())
