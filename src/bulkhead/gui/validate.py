"""dom0's checks on everything a qube's GUI agent says: every number, every string.

The qube is hostile.  :class:`GuestState` takes the raw messages cut by
:class:`bulkhead.guest.gui_protocol.Reader` (whose header checks already bound
every length) and turns each into a checked, typed event for the drawing code,
or raises :class:`Violation`, after which the GUI daemon closes the qube's GUI
connection.  Nothing here touches X: the rules are testable on their own.

The rules: a HELLO with our version first and only once; at most
``MAX_WINDOWS`` windows; window ids nonzero and known (or new, for CREATE);
sizes 1..MAX_DIM; coordinates within +-MAX_COORD; pixel rectangles nonempty,
inside their window, with exactly ``w*h*4`` bytes; a clipboard only when dom0
asked for one.  Titles keep printable characters only: control characters,
bidi overrides and isolates and every other format character (Unicode
category ``Cf``), line and paragraph separators are dropped; then cut at
``TITLE_CHARS``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ..guest import gui_protocol as G
from ..guest.gui_protocol import Violation

__all__ = ["GuestState", "Violation", "sanitize_title", "sanitize_class", "Window",
           "Created", "Destroyed", "Configured", "Mapped", "Unmapped", "Titled", "Classed",
           "Pixels", "Clipboard", "Hello"]

_CLASS_OK = re.compile(r"[^A-Za-z0-9._+-]")


def sanitize_title(untrusted_title: bytes) -> str:
    """Printable characters only (no control, bidi or other format characters), at most 128."""
    text = untrusted_title.decode("utf-8", errors="replace")
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        # Cc control, Cf format (bidi overrides/isolates, zero-width...), Cs surrogates,
        # Co private use, Cn unassigned, Zl/Zp line/paragraph separators.
        if cat[0] == "C" or cat in ("Zl", "Zp"):
            continue
        kept.append(ch)
        if len(kept) == G.TITLE_CHARS:
            break
    return "".join(kept)


def sanitize_class(untrusted_class: bytes) -> str:
    return _CLASS_OK.sub("", untrusted_class.decode("ascii", errors="replace"))[:G.MAX_CLASS_BYTES]


@dataclass
class Window:
    wid: int
    x: int
    y: int
    w: int
    h: int
    override_redirect: bool
    mapped: bool = False
    title: str = ""
    wm_class: str = ""


@dataclass(frozen=True)
class Hello:
    version: int


@dataclass(frozen=True)
class Created:
    window: Window


@dataclass(frozen=True)
class Destroyed:
    wid: int


@dataclass(frozen=True)
class Configured:
    wid: int
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Mapped:
    wid: int


@dataclass(frozen=True)
class Unmapped:
    wid: int


@dataclass(frozen=True)
class Titled:
    wid: int
    title: str


@dataclass(frozen=True)
class Classed:
    wid: int
    wm_class: str


@dataclass(frozen=True)
class Pixels:
    wid: int
    x: int
    y: int
    w: int
    h: int
    data: memoryview  # exactly w*h*4 bytes, BGRX


@dataclass(frozen=True)
class Clipboard:
    kind: int
    data: bytes


Event = (Hello | Created | Destroyed | Configured | Mapped | Unmapped | Titled | Classed
         | Pixels | Clipboard)


def _check_geometry(x: int, y: int, w: int, h: int) -> None:
    if not (1 <= w <= G.MAX_DIM and 1 <= h <= G.MAX_DIM):
        raise Violation(f"window size {w}x{h} outside 1..{G.MAX_DIM}")
    if not (-G.MAX_COORD <= x <= G.MAX_COORD and -G.MAX_COORD <= y <= G.MAX_COORD):
        raise Violation(f"window position {x},{y} outside +-{G.MAX_COORD}")


# dom0 keeps a pixmap per window on the user's X server: their total area is bounded
# too, or a qube could make the desktop's X server allocate gigabytes.
MAX_TOTAL_AREA = 16 * 1024 * 1024


class GuestState:
    """What one qube's GUI agent has told dom0, every message checked before it counts."""

    def __init__(self, max_windows: int = G.MAX_WINDOWS,
                 max_total_area: int = MAX_TOTAL_AREA) -> None:
        self.max_windows = max_windows
        self.max_total_area = max_total_area
        self.windows: dict[int, Window] = {}
        self.hello = False
        self.clipboard_wanted = False   # dom0 sent D_CLIP_REQUEST, no answer yet

    def _check_area(self, wid: int, w: int, h: int) -> None:
        area = w * h + sum(v.w * v.h for k, v in self.windows.items() if k != wid)
        if area > self.max_total_area:
            raise Violation(f"windows of {area} pixels in all (at most {self.max_total_area})")

    def _window(self, wid: int) -> Window:
        try:
            return self.windows[wid]
        except KeyError:
            raise Violation(f"unknown window {wid:#x}") from None

    def handle(self, mtype: int, wid: int, untrusted_payload: bytes) -> Event:
        """One message, as cut by the protocol's Reader (header and length already checked)."""
        if not self.hello:
            if mtype != G.G_HELLO:
                raise Violation(f"message type {mtype} before HELLO")
        if mtype == G.G_HELLO:
            if self.hello:
                raise Violation("a second HELLO")
            (version,) = G.U32.unpack(untrusted_payload)
            if version != G.VERSION:
                raise Violation(f"protocol version {version}, dom0 speaks {G.VERSION}")
            self.hello = True
            return Hello(version)
        if mtype == G.G_CREATE:
            x, y, w, h, flags = G.CREATE.unpack(untrusted_payload)
            if wid in self.windows:
                raise Violation(f"window {wid:#x} created twice")
            if len(self.windows) >= self.max_windows:
                raise Violation(f"more than {self.max_windows} windows")
            if flags & ~G.CREATE_OVERRIDE_REDIRECT:
                raise Violation(f"unknown window flags {flags:#x}")
            _check_geometry(x, y, w, h)
            self._check_area(wid, w, h)
            win = Window(wid, x, y, w, h, bool(flags & G.CREATE_OVERRIDE_REDIRECT))
            self.windows[wid] = win
            return Created(win)
        if mtype == G.G_DESTROY:
            self._window(wid)
            del self.windows[wid]
            return Destroyed(wid)
        if mtype == G.G_CONFIGURE:
            win = self._window(wid)
            x, y, w, h = G.GEOMETRY.unpack(untrusted_payload)
            _check_geometry(x, y, w, h)
            self._check_area(wid, w, h)
            win.x, win.y, win.w, win.h = x, y, w, h
            return Configured(wid, x, y, w, h)
        if mtype == G.G_MAP:
            self._window(wid).mapped = True
            return Mapped(wid)
        if mtype == G.G_UNMAP:
            self._window(wid).mapped = False
            return Unmapped(wid)
        if mtype == G.G_TITLE:
            win = self._window(wid)
            win.title = sanitize_title(untrusted_payload)
            return Titled(wid, win.title)
        if mtype == G.G_CLASS:
            win = self._window(wid)
            win.wm_class = sanitize_class(untrusted_payload)
            return Classed(wid, win.wm_class)
        if mtype == G.G_PIXELS:
            win = self._window(wid)
            if len(untrusted_payload) < G.RECT.size:
                raise Violation("pixel message shorter than its rectangle")
            x, y, w, h = G.RECT.unpack_from(untrusted_payload)
            # Python integers do not overflow, but be explicit: each term is bounded first.
            if not (1 <= w <= win.w and 1 <= h <= win.h and x <= win.w - w and y <= win.h - h):
                raise Violation(f"pixel rectangle {w}x{h}+{x}+{y} outside window "
                                f"{wid:#x} ({win.w}x{win.h})")
            want = w * h * G.BYTES_PER_PIXEL
            got = len(untrusted_payload) - G.RECT.size
            if got != want:
                raise Violation(f"pixel data of {got} bytes for {w}x{h} (needs {want})")
            return Pixels(wid, x, y, w, h, memoryview(untrusted_payload)[G.RECT.size:])
        if mtype == G.G_CLIPBOARD:
            if not self.clipboard_wanted:
                raise Violation("a clipboard nobody asked for")
            self.clipboard_wanted = False
            if not untrusted_payload or untrusted_payload[0] not in G.CLIP_KINDS:
                raise Violation("clipboard of unknown kind")
            return Clipboard(untrusted_payload[0], bytes(untrusted_payload[1:]))
        raise Violation(f"unexpected message type {mtype}")
