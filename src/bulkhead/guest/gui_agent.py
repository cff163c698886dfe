"""The qube's GUI agent: an X server with no screen, its windows sent to dom0 one by one.

Runs in qubes whose ``gui`` feature is set (the kernel command line then says
``bulkhead.gui=1`` and ``rc.sysinit`` starts us).  As root we only open our
virtio-serial port (:data:`gui_protocol.PORT_NAME`); then we become ``user``
and start ``Xvfb :0`` at the size of the user's screen, which dom0's HELLO
tells us (or a default if no GUI daemon connects soon).

What we send: every mapped top-level or override-redirect window (menus,
tooltips) with its geometry, title and WM_CLASS, and its pixels whenever
DAMAGE says they changed.  Windows are composited off-screen (XComposite), so
each window's own pixels are right even where windows overlap here; we read
them from the window's pixmap with MIT-SHM ``ShmGetImage`` (6 ms for 800x600
under TCG, against 99 ms for a plain GetImage), declared below as raw requests
because python-xlib has no MIT-SHM.  No compression: under TCG zlib costs
more than the bytes it saves on virtio-serial.

What we do for dom0: replay keys and buttons with XTEST, focus and raise the
window dom0 says has focus, move/resize and close (WM_DELETE_WINDOW) windows,
and serve the clipboard (Ctrl+Shift+C/V in dom0).

dom0 is trusted; still, we keep within the protocol's limits, so that a
legitimate window never trips dom0's checks: windows larger than the limits
are not shown, nor windows past the maximum count.
"""

import os
import pwd
import select
import subprocess
import sys
import time

from . import gui_protocol as G
from .gui_selection import SelectionMixin
from .gui_shm import ShmSegment
from .gui_shm import requests as shm_requests

# The display the agent's X server takes (another for tests that run the agent on a host).
DISPLAY = os.environ.get("BULKHEAD_GUI_DISPLAY", ":0")
DEFAULT_SCREEN = (1920, 1080)
HELLO_WAIT = 8.0            # seconds to wait for dom0's screen size before starting X anyway
BATCH_EVENTS = 500          # X events handled before pixels are sent (else scrolling starves us)
BATCH_SECONDS = 0.05
OUT_HIGH_WATER = 8 * 1024 * 1024   # no new pixel grabs while this much waits for dom0
READ_CHUNK = 65536


def log(msg):
    try:
        os.write(2, ("bulkhead-gui-agent: %s\n" % msg).encode("utf-8", "replace"))
    except OSError:
        pass


def find_port():
    base = "/sys/class/virtio-ports"
    for _ in range(200):
        try:
            for entry in os.listdir(base):
                try:
                    with open("%s/%s/name" % (base, entry)) as f:
                        if f.read().strip() == G.PORT_NAME:
                            return "/dev/" + entry
                except OSError:
                    continue
        except OSError:
            pass
        time.sleep(0.05)
    return None


class Agent(SelectionMixin):
    def __init__(self, port_fd):
        from Xlib import X  # noqa: PLC0415 -- after the port is open: imports cost seconds
        self.X = X
        self.port = port_fd
        self.reader = G.Reader(G.FROM_DOM0)
        self.out = bytearray()
        self.connected = False      # dom0 said HELLO on this connection
        self.hung_up = True
        self.screen = None
        self.wins = {}               # wid -> dict
        self.dirty = {}              # wid -> [x0, y0, x1, y1]
        self.clip_owned = None       # (kind, data) we serve as CLIPBOARD owner
        self.clip_pending = None     # "targets" | "text" | "png" while fetching for dom0
        self.keymap = None           # dom0's XKB names, checked (gui_protocol.check_keymap_names)
        self.d = None
        self.xpid = 0

    # --- the port ------------------------------------------------------------
    def send(self, mtype, wid, payload=b""):
        if self.connected:
            self.out += G.pack(mtype, wid, payload)

    def flush_port(self):
        while self.out:
            try:
                n = os.write(self.port, self.out)
            except BlockingIOError:
                return
            except OSError:
                self.disconnected()
                return
            del self.out[:n]

    def disconnected(self):
        self.connected = False
        self.hung_up = True
        self.out.clear()
        self.reader = G.Reader(G.FROM_DOM0)

    def port_readable(self):
        try:
            data = os.read(self.port, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.disconnected()
            return
        try:
            for mtype, wid, payload in self.reader.feed(data):
                self.handle(mtype, wid, payload)
        except G.Violation as e:
            log("protocol error from dom0: %s" % e)
            self.disconnected()

    def wait_hello(self, timeout):
        """Before X runs: wait for dom0's HELLO, which tells the screen size."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.screen is None:
            p = select.poll()
            p.register(self.port, select.POLLIN)
            ev = p.poll(100)
            if ev and ev[0][1] & select.POLLIN:
                self.port_readable()
            else:
                time.sleep(0.1)   # POLLHUP: no GUI daemon yet

    # --- X ---------------------------------------------------------------------
    def start_x(self):
        w, h = self.screen or DEFAULT_SCREEN
        self.max_screen = (w, h)   # Xvfb's framebuffer: RandR can shrink the screen, not grow it
        sock = "/tmp/.X11-unix/X" + DISPLAY.lstrip(":")
        if os.path.exists(sock):
            try:
                os.unlink(sock)
            except OSError:
                pass
        pid = os.fork()
        self.xpid = pid
        if pid == 0:
            try:
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.setsid()
                os.execvp("Xvfb", ["Xvfb", DISPLAY, "-screen", "0", "%dx%dx24" % (w, h),
                                   "-nolisten", "tcp", "-extension", "GLX", "-noreset",
                                   "+extension", "Composite", "+extension", "DAMAGE"])
            finally:
                os._exit(127)
        from Xlib import display  # noqa: PLC0415
        for _ in range(300):
            try:
                self.d = display.Display(DISPLAY)
                break
            except Exception:  # noqa: BLE001 -- not up yet
                time.sleep(0.05)
        if self.d is None:
            raise RuntimeError("Xvfb did not start")
        self.setup_x()
        self.apply_keymap()

    def stop_x(self):
        try:
            self.d.close()
        except Exception:  # noqa: BLE001
            pass
        self.d = None
        self.shm.detach()
        try:
            os.kill(self.xpid, 15)
            os.waitpid(self.xpid, 0)
        except OSError:
            pass
        self.wins.clear()
        self.dirty.clear()
        self.clip_owned = self.clip_pending = None

    def fit_screen(self):
        """Make the X screen the size of the user's (dom0's HELLO came after X started)."""
        w, h = self.screen
        if (w, h) == self.screen_size:
            return
        if w <= self.max_screen[0] and h <= self.max_screen[1]:
            # Xvfb's one CRTC spans the initial size: off first, or the smaller screen is refused.
            d, root = self.d, self.root
            res = root.xrandr_get_screen_resources()
            for crtc in res.crtcs:
                d.xrandr_set_crtc_config(crtc, res.config_timestamp, 0, 0, 0, 1, [])
            root.xrandr_set_screen_size(w, h, w * 254 // 960, h * 254 // 960)   # 96 dpi
            d.sync()
            g = root.get_geometry()
            self.screen_size = (g.width, g.height)
            log("screen resized to %dx%d" % self.screen_size)
        elif not [c for c in self.root.query_tree().children if c.id != self.helper.id]:
            # Larger than Xvfb can grow, and nothing runs on it yet: start it afresh.
            self.stop_x()
            self.start_x()
            log("X restarted at %dx%d" % self.screen_size)
        else:
            log("screen kept at %dx%d (dom0's is %dx%d; windows are open)"
                % (self.screen_size + (w, h)))

    def apply_keymap(self):
        """The user's XKB layout (names dom0 sent, checked) on our X server: setxkbmap."""
        if self.keymap is None or self.d is None:
            return
        rules, model, layout, variant, options = self.keymap
        argv = ["setxkbmap", "-display", DISPLAY, "-rules", rules, "-layout", layout]
        argv += ["-model", model] if model else []
        argv += ["-variant", variant] if variant else []
        argv += ["-option", ""] + (["-option", options] if options else [])
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=30, check=False)
            err = r.stderr.decode("utf-8", "replace").strip()
            log("keyboard layout %s: %s" % (",".join(self.keymap),
                                            "applied" if r.returncode == 0 else "failed: " + err))
        except (OSError, subprocess.TimeoutExpired) as e:
            log("setxkbmap failed: %s" % e)

    def setup_x(self):
        from Xlib.ext import composite, damage, xtest  # noqa: F401,PLC0415 -- register them
        X = self.X
        d = self.d
        d.set_error_handler(lambda *a: None)   # windows vanish between events: ignore BadWindow
        self.root = d.screen().root
        self.atoms = {n: d.intern_atom(n) for n in (
            "WM_NAME", "_NET_WM_NAME", "UTF8_STRING", "WM_PROTOCOLS", "WM_DELETE_WINDOW",
            "CLIPBOARD", "TARGETS", "image/png", "STRING", "TEXT", "BULKHEAD_CLIP", "INCR",
            "WM_CLASS")}
        d.damage_query_version()   # DAMAGE answers nothing before this
        self.damage_event = d.query_extension("DAMAGE").first_event
        d.composite_query_version()
        self.root.composite_redirect_subwindows(composite.RedirectAutomatic)
        self.root.change_attributes(event_mask=X.SubstructureNotifyMask)
        self.helper = self.root.create_window(-10, -10, 1, 1, 0, 0, override_redirect=True,
                                              event_mask=X.PropertyChangeMask)
        self.shm_opcode = d.query_extension("MIT-SHM").major_opcode
        g = self.root.get_geometry()
        self.screen_size = (g.width, g.height)
        self.shm = ShmSegment(g.width * g.height * 4)
        self.shmseg = d.display.allocate_resource_id()
        ShmAttach(display=d.display, opcode=self.shm_opcode, shmseg=self.shmseg,
                  shmid=self.shm.shmid, read_only=False)
        d.sync()
        self.shm.remove()
        for child in self.root.query_tree().children:
            self.track(child)
            attrs = child.get_attributes()
            if attrs and attrs.map_state == X.IsViewable:
                self.mapped(child.id)
        d.flush()

    def track(self, win):
        try:
            g = win.get_geometry()
            a = win.get_attributes()
        except Exception:  # noqa: BLE001 -- gone already
            return
        if g is None or a is None:
            return
        self.wins[win.id] = {"win": win, "x": g.x, "y": g.y, "w": g.width, "h": g.height,
                             "or": bool(a.override_redirect), "mapped": False,
                             "announced": False, "damage": None, "pixmap": None}
        win.change_attributes(event_mask=self.X.PropertyChangeMask)

    def showable(self, w):
        return (1 <= w["w"] <= G.MAX_DIM and 1 <= w["h"] <= G.MAX_DIM
                and abs(w["x"]) <= G.MAX_COORD and abs(w["y"]) <= G.MAX_COORD)

    def announce(self, wid):
        w = self.wins[wid]
        if not self.connected or not self.showable(w):
            return
        if not w["announced"]:
            if sum(1 for v in self.wins.values() if v["announced"]) >= G.MAX_WINDOWS:
                return
            w["announced"] = True
            self.send(G.G_CREATE, wid, G.CREATE.pack(w["x"], w["y"], w["w"], w["h"],
                                                     G.CREATE_OVERRIDE_REDIRECT if w["or"] else 0))
            self.send_title(wid)
            self.send_class(wid)
        if w["mapped"]:
            self.send(G.G_MAP, wid)
            self.dirty[wid] = [0, 0, w["w"], w["h"]]

    def mapped(self, wid):
        w = self.wins.get(wid)
        if w is None:
            return
        w["mapped"] = True
        from Xlib.ext import damage  # noqa: PLC0415
        if w["damage"] is None:
            w["damage"] = w["win"].damage_create(damage.DamageReportRawRectangles)
        self.name_pixmap(w)
        self.announce(wid)

    def name_pixmap(self, w):
        if w["pixmap"] is not None:
            w["pixmap"].free()
            w["pixmap"] = None
        if w["mapped"]:
            try:
                w["pixmap"] = w["win"].composite_name_window_pixmap()
            except Exception:  # noqa: BLE001
                w["pixmap"] = None

    def send_title(self, wid):
        w = self.wins[wid]
        title = b""
        for prop, typ in (("_NET_WM_NAME", "UTF8_STRING"), ("WM_NAME", None)):
            try:
                p = w["win"].get_full_property(self.atoms[prop], self.X.AnyPropertyType,
                                               G.MAX_TITLE_BYTES)
            except Exception:  # noqa: BLE001
                p = None
            if p is not None and p.value:
                v = p.value
                title = v if isinstance(v, bytes) else str(v).encode()
                if isinstance(v, str):
                    title = v.encode("latin-1", "replace")
                break
        self.send(G.G_TITLE, wid, bytes(title[:G.MAX_TITLE_BYTES]))

    def send_class(self, wid):
        try:
            cls = self.wins[wid]["win"].get_wm_class()
        except Exception:  # noqa: BLE001
            cls = None
        name = (cls[1] if cls else "") or ""
        self.send(G.G_CLASS, wid, name.encode("ascii", "replace")[:G.MAX_CLASS_BYTES])

    def x_event(self, ev):
        X = self.X
        t = ev.type
        if t == X.CreateNotify:
            if ev.parent == self.root and ev.window.id not in self.wins:
                self.track(ev.window)
        elif t == X.MapNotify:
            if ev.window.id not in self.wins:
                self.track(ev.window)
            self.mapped(ev.window.id)
        elif t == X.UnmapNotify:
            w = self.wins.get(ev.window.id)
            if w is not None:
                w["mapped"] = False
                self.dirty.pop(ev.window.id, None)
                if w["announced"]:
                    self.send(G.G_UNMAP, ev.window.id)
        elif t == X.DestroyNotify:
            w = self.wins.pop(ev.window.id, None)
            self.dirty.pop(ev.window.id, None)
            if w is not None and w["announced"]:
                self.send(G.G_DESTROY, ev.window.id)
        elif t == X.ConfigureNotify:
            w = self.wins.get(ev.window.id)
            if w is None:
                return
            resized = (w["w"], w["h"]) != (ev.width, ev.height)
            w.update(x=ev.x, y=ev.y, w=ev.width, h=ev.height)
            if resized:
                self.name_pixmap(w)
            if w["announced"] and self.showable(w):
                self.send(G.G_CONFIGURE, ev.window.id, G.GEOMETRY.pack(ev.x, ev.y, ev.width, ev.height))
                if resized and w["mapped"]:
                    self.dirty[ev.window.id] = [0, 0, ev.width, ev.height]
            elif not w["announced"] and w["mapped"]:
                self.announce(ev.window.id)
        elif t == X.PropertyNotify:
            wid = ev.window.id
            if wid == self.helper.id:
                return
            if wid in self.wins and self.wins[wid]["announced"]:
                if ev.atom in (self.atoms["WM_NAME"], self.atoms["_NET_WM_NAME"]):
                    self.send_title(wid)
                elif ev.atom == self.atoms["WM_CLASS"]:
                    self.send_class(wid)
        elif t == X.SelectionNotify:
            self.selection_notify(ev)
        elif t == X.SelectionRequest:
            self.selection_request(ev)
        elif t == X.SelectionClear:
            self.clip_owned = None
        elif t == self.damage_event:
            wid = ev.drawable.id if hasattr(ev.drawable, "id") else ev.drawable
            w = self.wins.get(wid)
            if w is None or not w["mapped"]:
                return
            a = ev.area
            x0, y0 = max(0, a.x), max(0, a.y)
            x1, y1 = min(w["w"], a.x + a.width), min(w["h"], a.y + a.height)
            if x1 <= x0 or y1 <= y0:
                return
            r = self.dirty.get(wid)
            if r is None:
                self.dirty[wid] = [x0, y0, x1, y1]
            else:
                r[0], r[1] = min(r[0], x0), min(r[1], y0)
                r[2], r[3] = max(r[2], x1), max(r[3], y1)

    def send_pixels(self):
        if not self.connected or len(self.out) > OUT_HIGH_WATER:
            return
        for wid, (x0, y0, x1, y1) in list(self.dirty.items()):
            w = self.wins.get(wid)
            del self.dirty[wid]
            if w is None or not w["announced"] or not w["mapped"] or w["pixmap"] is None:
                continue
            x1, y1 = min(x1, w["w"]), min(y1, w["h"])
            width = x1 - x0
            if width <= 0 or y1 <= y0:
                continue
            rows = max(1, min(G.MAX_PIXEL_BYTES, self.shm.size) // (width * 4))
            y = y0
            while y < y1:
                h = min(rows, y1 - y)
                try:
                    ShmGetImage(display=self.d.display, opcode=self.shm_opcode,
                                drawable=w["pixmap"].id, x=x0, y=y, width=width, height=h,
                                plane_mask=0xFFFFFFFF, format=self.X.ZPixmap,
                                shmseg=self.shmseg, offset=0)
                except Exception as e:  # noqa: BLE001 -- the window went meanwhile
                    log("grab failed: %s" % e)
                    break
                self.send(G.G_PIXELS, wid, G.RECT.pack(x0, y, width, h) + self.shm.read(width * h * 4))
                y += h

    # --- dom0's messages -------------------------------------------------------
    def handle(self, mtype, wid, payload):
        X = self.X
        if mtype == G.D_HELLO:
            version, sw, sh = G.D_HELLO_S.unpack(payload)
            if version != G.VERSION:
                log("dom0 speaks version %d" % version)
                return
            self.screen = (min(max(sw, 64), G.MAX_DIM), min(max(sh, 64), G.MAX_DIM))
            self.connected = True
            self.hung_up = False
            self.out.clear()
            self.out += G.pack(G.G_HELLO, 0, G.U32.pack(G.VERSION))
            for w in self.wins.values():
                w["announced"] = False
            if self.d is not None:
                self.fit_screen()
                for wid, w in list(self.wins.items()):
                    if w["mapped"]:
                        self.announce(wid)
            return
        if mtype == G.D_KEYMAP:
            self.keymap = G.unpack_keymap(payload)
            self.apply_keymap()
            return
        if self.d is None or not self.connected:
            return
        from Xlib.ext import xtest  # noqa: PLC0415
        w = self.wins.get(wid)
        if mtype == G.D_KEY:
            keycode, pressed, _state = G.KEY.unpack(payload)
            if 8 <= keycode <= 255:
                xtest.fake_input(self.d, X.KeyPress if pressed else X.KeyRelease, keycode)
        elif mtype in (G.D_BUTTON, G.D_MOTION) and w is not None:
            if mtype == G.D_BUTTON:
                x, y, button, pressed, _state = G.BUTTON.unpack(payload)
            else:
                x, y, _state = G.MOTION.unpack(payload)
            xtest.fake_input(self.d, X.MotionNotify, x=w["x"] + x, y=w["y"] + y)
            if mtype == G.D_BUTTON and 1 <= button <= 255:
                if pressed:
                    self.raise_focus(w)
                xtest.fake_input(self.d, X.ButtonPress if pressed else X.ButtonRelease, button)
        elif mtype == G.D_CONFIGURE and w is not None:
            x, y, width, height = G.GEOMETRY.unpack(payload)
            if 1 <= width <= G.MAX_DIM and 1 <= height <= G.MAX_DIM:
                w["win"].configure(x=x, y=y, width=width, height=height)
        elif mtype == G.D_CLOSE and w is not None:
            self.close(w)
        elif mtype == G.D_FOCUS and w is not None:
            (focused,) = G.U32.unpack(payload)
            if focused:
                self.raise_focus(w)
        elif mtype == G.D_CLIP_REQUEST:
            self.clip_fetch()
        elif mtype == G.D_CLIP_DATA:
            kind = payload[0] if payload else 0
            if kind in G.CLIP_KINDS:
                self.clip_owned = (kind, bytes(payload[1:]))
                self.helper.set_selection_owner(self.atoms["CLIPBOARD"], X.CurrentTime)
        self.d.flush()

    def raise_focus(self, w):
        X = self.X
        if w["or"]:
            return
        w["win"].configure(stack_mode=X.Above)
        w["win"].set_input_focus(X.RevertToParent, X.CurrentTime)

    def close(self, w):
        from Xlib.protocol import event  # noqa: PLC0415
        a = self.atoms
        try:
            protocols = w["win"].get_wm_protocols() or []
        except Exception:  # noqa: BLE001
            protocols = []
        if a["WM_DELETE_WINDOW"] in protocols:
            ev = event.ClientMessage(window=w["win"], client_type=a["WM_PROTOCOLS"],
                                     data=(32, [a["WM_DELETE_WINDOW"], self.X.CurrentTime, 0, 0, 0]))
            w["win"].send_event(ev)
        else:
            w["win"].kill_client()   # what a window manager does for a window without the protocol

    # --- the loop --------------------------------------------------------------------
    def run(self):
        while True:
            xfd = self.d.fileno()   # anew each time: fit_screen may restart X
            p = select.poll()
            p.register(xfd, select.POLLIN)
            if not self.hung_up or self.connected:
                p.register(self.port, select.POLLIN | (select.POLLOUT if self.out else 0))
            timeout = 200 if self.hung_up else (50 if self.clip_pending else None)
            if self.d.pending_events():
                # python-xlib may already hold events it read along with a reply:
                # the socket would not wake poll for them.
                timeout = 0
            for fd, ev in p.poll(timeout):
                if fd == self.port:
                    if ev & select.POLLIN:
                        self.port_readable()
                    elif ev & select.POLLHUP:
                        self.disconnected()
                    if ev & select.POLLOUT:
                        self.flush_port()
            if self.hung_up:
                self.probe_port()
            self.x_batch()
            self.clip_timeout()
            self.send_pixels()
            self.flush_port()

    def probe_port(self):
        p = select.poll()
        p.register(self.port, select.POLLIN | select.POLLOUT)
        ev = p.poll(0)
        if ev and not ev[0][1] & select.POLLHUP:
            self.hung_up = False   # a GUI daemon connected; its HELLO follows
            if ev[0][1] & select.POLLIN:
                self.port_readable()

    def x_batch(self):
        start = time.monotonic()
        n = 0
        while self.d.pending_events() and n < BATCH_EVENTS and time.monotonic() - start < BATCH_SECONDS:
            self.x_event(self.d.next_event())
            n += 1
        self.d.flush()


ShmAttach = ShmGetImage = None   # the MIT-SHM requests, declared in main once Xlib is in


def main():
    global ShmAttach, ShmGetImage
    port = find_port()
    if port is None:
        log("no virtio-serial port named %s" % G.PORT_NAME)
        return 1
    fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    # The port is all we need root for: X and its clients are the user's.
    pw = pwd.getpwnam("user")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ.update(HOME=pw.pw_dir, USER="user", DISPLAY=DISPLAY)
    agent = Agent(fd)
    agent.wait_hello(HELLO_WAIT)
    ShmAttach, ShmGetImage = shm_requests()
    agent.start_x()
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
