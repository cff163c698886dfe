"""The GUI protocol between a qube's GUI agent and dom0's GUI daemon: tiny, fixed, versioned.

One module for both ends: dom0 imports it as ``bulkhead.guest.gui_protocol``;
the template installs it into the guest as ``bulkhead_guest.gui_protocol``.
Builtins only (``struct``), so the guest pays nothing to import it.

It runs on a virtio-serial port of its own (:data:`PORT_NAME`), apart from
the qrexec agent's, so a flood of pixels never delays a command, and a GUI
violation closes only the GUI.  Guest -> dom0 is virtio-serial's fast
direction (~200 MB/s here), the one pixels take; dom0 -> guest carries only
input events, focus, sizes and a pasted clipboard.

Wire format: a 12-byte header, then exactly ``length`` payload bytes::

    u16 type | u16 flags (0) | u32 window | u32 length        (little endian)

Every message type has a fixed payload size, or a maximum one checked from
the header *before* the payload is read (:data:`FIXED`, :data:`MAX_SIZE`).
Windows are the guest's X window ids (nonzero); window 0 is the connection.

Guest -> dom0 (``G_*``)::

    G_HELLO      u32 version                       first message, once per connection
    G_CREATE     i32 x, i32 y, u32 w, u32 h, u32 flags (1 = override-redirect)
    G_DESTROY    -
    G_CONFIGURE  i32 x, i32 y, u32 w, u32 h
    G_MAP        -                                 show the window
    G_UNMAP      -
    G_TITLE      UTF-8 bytes (at most MAX_TITLE_BYTES; dom0 sanitises and cuts)
    G_CLASS      bytes (WM_CLASS's class part; dom0 keeps [A-Za-z0-9._+-])
    G_PIXELS     u32 x, u32 y, u32 w, u32 h, then w*h*4 bytes of BGRX pixels
    G_CLIPBOARD  u8 kind, then the data (window 0; only after a D_CLIP_REQUEST)

dom0 -> guest (``D_*``)::

    D_HELLO      u32 version, u32 screen width, u32 screen height
    D_KEY        u32 X keycode, u32 pressed (0/1), u32 modifier state
    D_BUTTON     i32 x, i32 y, u32 button, u32 pressed, u32 state   (x, y in the window)
    D_MOTION     i32 x, i32 y, u32 state
    D_CONFIGURE  i32 x, i32 y, u32 w, u32 h        the user moved or resized the window
    D_CLOSE      -                                 the user closed it: WM_DELETE_WINDOW
    D_FOCUS      u32 focused (0/1)
    D_CLIP_REQUEST  -                              (window 0) send your clipboard
    D_CLIP_DATA  u8 kind, then the data            (window 0) paste this
    D_KEYMAP     rules NUL model NUL layout NUL variant NUL options   (window 0)
                 the user's XKB layout names (the root window's _XKB_RULES_NAMES),
                 each checked by :func:`check_keymap_names` at both ends
"""

import struct

PORT_NAME = "org.bulkhead.gui"
VERSION = 2           # 2: D_KEYMAP
HEADER = struct.Struct("<HHII")
HEADER_SIZE = HEADER.size

# --- limits (dom0 enforces them; the guest keeps within them) -------------------
MAX_WINDOWS = 256              # windows a qube may have at once
MAX_DIM = 8192                 # a window's width or height, in pixels
MAX_COORD = 32767              # |x|, |y| of a window (X11's own range is 16 bits)
MAX_TITLE_BYTES = 512          # on the wire; dom0 shows at most TITLE_CHARS
TITLE_CHARS = 128
MAX_CLASS_BYTES = 64
MAX_PIXEL_BYTES = 4 * 1024 * 1024   # one G_PIXELS message; the guest sends strips
CLIPBOARD_MAX = 4 * 1024 * 1024     # text or PNG, passed on as opaque bytes
BYTES_PER_PIXEL = 4

# --- guest -> dom0 ---------------------------------------------------------------
G_HELLO = 1
G_CREATE = 2
G_DESTROY = 3
G_CONFIGURE = 4
G_MAP = 5
G_UNMAP = 6
G_TITLE = 7
G_CLASS = 8
G_PIXELS = 9
G_CLIPBOARD = 10

# --- dom0 -> guest ---------------------------------------------------------------
D_HELLO = 101
D_KEY = 102
D_BUTTON = 103
D_MOTION = 104
D_CONFIGURE = 105
D_CLOSE = 106
D_FOCUS = 107
D_CLIP_REQUEST = 108
D_CLIP_DATA = 109
D_KEYMAP = 110

CREATE_OVERRIDE_REDIRECT = 1

CLIP_TEXT = 1    # UTF-8 text (UTF8_STRING)
CLIP_PNG = 2     # image/png: opaque bytes, never decoded by dom0
CLIP_KINDS = (CLIP_TEXT, CLIP_PNG)

U32 = struct.Struct("<I")
GEOMETRY = struct.Struct("<iiII")          # x, y, w, h
CREATE = struct.Struct("<iiIII")           # x, y, w, h, flags
RECT = struct.Struct("<IIII")              # pixels: x, y, w, h (inside the window)
D_HELLO_S = struct.Struct("<III")
KEY = struct.Struct("<III")
BUTTON = struct.Struct("<iiIII")
MOTION = struct.Struct("<iiI")

# Payload sizes: FIXED types must have exactly this length; the others at most MAX_SIZE.
FIXED = {
    G_HELLO: U32.size, G_CREATE: CREATE.size, G_DESTROY: 0, G_CONFIGURE: GEOMETRY.size,
    G_MAP: 0, G_UNMAP: 0,
    D_HELLO: D_HELLO_S.size, D_KEY: KEY.size, D_BUTTON: BUTTON.size, D_MOTION: MOTION.size,
    D_CONFIGURE: GEOMETRY.size, D_CLOSE: 0, D_FOCUS: U32.size, D_CLIP_REQUEST: 0,
}
MAX_SIZE = {
    G_TITLE: MAX_TITLE_BYTES, G_CLASS: MAX_CLASS_BYTES,
    G_PIXELS: RECT.size + MAX_PIXEL_BYTES, G_CLIPBOARD: 1 + CLIPBOARD_MAX,
    D_CLIP_DATA: 1 + CLIPBOARD_MAX, D_KEYMAP: 5 * (1 + 64),
}
FROM_GUEST = frozenset(t for t in list(FIXED) + list(MAX_SIZE) if t < 100)
FROM_DOM0 = frozenset(t for t in list(FIXED) + list(MAX_SIZE) if t > 100)
# Messages about one window (nonzero id) versus about the connection (window 0).
CONNECTION_MESSAGES = frozenset((G_HELLO, G_CLIPBOARD, D_HELLO, D_CLIP_REQUEST, D_CLIP_DATA,
                                 D_KEYMAP))


class Violation(Exception):
    """The peer broke the protocol: the connection must be closed."""


# XKB's rules/model/layout/variant/options names: they become setxkbmap's arguments in
# the qube (argv, never a shell), so: short, a charset with no path separator, no
# leading "-" (it would read as an option).  Layout lists ("us,de"), variants
# ("nodeadkeys"), options ("grp:alt_shift_toggle,compose:ralt") all fit.
KEYMAP_FIELDS = ("rules", "model", "layout", "variant", "options")
KEYMAP_NAME_MAX = 64
_KEYMAP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:+-")


def check_keymap_names(names):
    """``names`` (5 str) if every one is a short, plain XKB name, else Violation."""
    if len(names) != len(KEYMAP_FIELDS):
        raise Violation("keymap: %d names, not %d" % (len(names), len(KEYMAP_FIELDS)))
    for field, name in zip(KEYMAP_FIELDS, names):
        if len(name) > KEYMAP_NAME_MAX or not set(name) <= _KEYMAP_CHARS or name.startswith("-"):
            raise Violation("keymap: bad %s name %r" % (field, name[:KEYMAP_NAME_MAX]))
    if not names[0] or not names[2]:
        raise Violation("keymap: no rules or no layout")
    return tuple(names)


def pack_keymap(names):
    return "\0".join(check_keymap_names(names)).encode("ascii")


def unpack_keymap(payload):
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise Violation("keymap: not ASCII") from None
    return check_keymap_names(text.split("\0"))


def pack(mtype, window, payload=b""):
    return HEADER.pack(mtype, 0, window, len(payload)) + payload


def check_header(mtype, flags, window, length, allowed):
    """Raise :class:`Violation` unless the header may be followed by ``length`` bytes."""
    if mtype not in allowed:
        raise Violation("unknown message type %d" % mtype)
    if flags != 0:
        raise Violation("nonzero flags %#x in message type %d" % (flags, mtype))
    fixed = FIXED.get(mtype)
    if fixed is not None:
        if length != fixed:
            raise Violation("message type %d must carry %d bytes, not %d" % (mtype, fixed, length))
    elif length > MAX_SIZE[mtype]:
        raise Violation("message type %d announces %d bytes (at most %d)"
                        % (mtype, length, MAX_SIZE[mtype]))
    if (mtype in CONNECTION_MESSAGES) != (window == 0):
        raise Violation("message type %d on window %#x" % (mtype, window))


class Reader:
    """Cuts a byte stream into messages, checking each header before buffering its payload.

    ``feed`` returns the complete messages as ``(type, window, payload)``; at most
    one message's payload is ever buffered, and its size was checked first.
    """

    def __init__(self, allowed):
        self.allowed = allowed
        self.buf = bytearray()
        self.header = None  # (type, window, length) of the message being read

    def feed(self, data):
        self.buf += data
        out = []
        while True:
            if self.header is None:
                if len(self.buf) < HEADER_SIZE:
                    return out
                mtype, flags, window, length = HEADER.unpack_from(self.buf)
                check_header(mtype, flags, window, length, self.allowed)
                del self.buf[:HEADER_SIZE]
                self.header = (mtype, window, length)
            mtype, window, length = self.header
            if len(self.buf) < length:
                return out
            payload = bytes(self.buf[:length])
            del self.buf[:length]
            self.header = None
            out.append((mtype, window, payload))

    def pending(self):
        """Bytes of a message begun but not finished (a peer that stops mid-message)."""
        return len(self.buf) + (HEADER_SIZE if self.header else 0)
