"""dom0's checks on the GUI protocol: every limit, before anything reaches X."""

from __future__ import annotations

import struct

import pytest

from bulkhead.guest import gui_protocol as G
from bulkhead.gui.clipboard import GlobalClipboard
from bulkhead.gui.validate import (Clipboard, Created, GuestState, Pixels, Titled, Violation,
                                   sanitize_title)


def hello() -> bytes:
    return G.pack(G.G_HELLO, 0, G.U32.pack(G.VERSION))


def create(wid: int, x: int = 0, y: int = 0, w: int = 10, h: int = 10, flags: int = 0) -> bytes:
    return G.pack(G.G_CREATE, wid, G.CREATE.pack(x, y, w, h, flags))


def feed(data: bytes, state: GuestState | None = None) -> list:
    state = state or GuestState()
    reader = G.Reader(G.FROM_GUEST)
    return [state.handle(*m) for m in reader.feed(data)]


def test_a_window_with_title_and_pixels():
    out = feed(hello() + create(5, 1, 2, 3, 2) + G.pack(G.G_TITLE, 5, "xterm".encode())
               + G.pack(G.G_PIXELS, 5, G.RECT.pack(0, 0, 3, 2) + b"\1" * 24))
    assert isinstance(out[1], Created) and out[1].window.w == 3
    assert out[2] == Titled(5, "xterm")
    assert isinstance(out[3], Pixels) and bytes(out[3].data) == b"\1" * 24


@pytest.mark.parametrize("data, why", [
    (b"\x13\x37garbage that is not a header", "unknown message type"),
    (create(1), "before HELLO"),
    (hello() + hello(), "second HELLO"),
    (G.pack(G.G_HELLO, 0, G.U32.pack(99)), "version"),
    (hello() + create(1, w=100000, h=100000), "size"),
    (hello() + create(1, x=-100000), "position"),
    (hello() + create(1, x=-2**31, y=2**31 - 1), "position"),
    (hello() + create(1, w=0), "size"),
    (hello() + create(0), "window 0x0"),
    (hello() + create(1) + create(1), "created twice"),
    (hello() + create(1, flags=8), "flags"),
    (hello() + G.pack(G.G_MAP, 7), "unknown window"),
    (hello() + G.HEADER.pack(G.G_PIXELS, 0, 1, 2**31), "announces"),
    (hello() + G.HEADER.pack(G.G_TITLE, 0, 1, G.MAX_TITLE_BYTES + 1), "announces"),
    (hello() + G.HEADER.pack(G.G_MAP, 1, 1, 0), "flags"),
    (hello() + G.HEADER.pack(G.G_MAP, 0, 1, 4), "must carry"),
    # pixels: outside the window, overflowing, shorter and longer than announced
    (hello() + create(1) + G.pack(G.G_PIXELS, 1, G.RECT.pack(5, 5, 10, 10) + b"\0" * 400), "outside"),
    (hello() + create(1) + G.pack(G.G_PIXELS, 1, G.RECT.pack(2**32 - 8, 0, 10, 1) + b"\0" * 40), "outside"),
    (hello() + create(1) + G.pack(G.G_PIXELS, 1, G.RECT.pack(0, 0, 10, 10) + b"\0" * 100), "needs 400"),
    (hello() + create(1) + G.pack(G.G_PIXELS, 1, G.RECT.pack(0, 0, 10, 10) + b"\0" * 800), "needs 400"),
    (hello() + create(1) + G.pack(G.G_PIXELS, 1, b"\0" * 8), "shorter than its rectangle"),
    (hello() + G.pack(G.G_CLIPBOARD, 0, b"\1abc"), "nobody asked"),
])
def test_violations(data, why):
    with pytest.raises(Violation, match=why):
        feed(data)


def test_window_count_and_total_area_are_bounded():
    data = hello() + b"".join(create(i) for i in range(1, 10001))
    with pytest.raises(Violation, match=f"more than {G.MAX_WINDOWS} windows"):
        feed(data)
    with pytest.raises(Violation, match="pixels in all"):
        feed(hello() + b"".join(create(i, w=8000, h=8000) for i in range(1, 3)))


def test_titles_are_printable_and_short():
    evil = "a\x07b\x1b[31m\u202ec\u2066d\u200be\u2028f\ud800".encode("utf-8", "surrogatepass")
    assert sanitize_title(evil) == "ab[31mcdef" + "\ufffd" * 3   # bad UTF-8: shown as such
    assert sanitize_title(b"\xff\xfeok") == "\ufffd\ufffdok"
    assert sanitize_title("x".encode() * 500) == "x" * G.TITLE_CHARS
    out = feed(hello() + create(1) + G.pack(G.G_TITLE, 1, "\u202eevil\n".encode()))
    assert out[-1] == Titled(1, "evil")


def test_clipboard_only_when_asked():
    state = GuestState()
    feed(hello(), state)
    state.clipboard_wanted = True
    out = feed(G.pack(G.G_CLIPBOARD, 0, bytes([G.CLIP_PNG]) + b"\x89PNG"), state)
    assert out == [Clipboard(G.CLIP_PNG, b"\x89PNG")]
    with pytest.raises(Violation):
        feed(G.pack(G.G_CLIPBOARD, 0, bytes([G.CLIP_TEXT])), state)


def test_reader_checks_the_header_before_the_payload():
    reader = G.Reader(G.FROM_GUEST)
    # A header announcing more than the limit fails before a single payload byte arrives.
    with pytest.raises(Violation):
        reader.feed(struct.pack("<HHII", G.G_CLIPBOARD, 0, 0, G.CLIPBOARD_MAX + 2))
    # dom0's own messages are not accepted from a qube.
    with pytest.raises(Violation):
        G.Reader(G.FROM_GUEST).feed(G.pack(G.D_KEY, 1, G.KEY.pack(38, 1, 0)))


def test_global_clipboard_is_taken_once(tmp_path):
    clip = GlobalClipboard(tmp_path)
    clip.put("work", G.CLIP_TEXT, b"hello")
    assert clip.peek().source == "work"
    entry = clip.take()
    assert (entry.source, entry.kind, entry.data) == ("work", G.CLIP_TEXT, b"hello")
    assert clip.take() is None
    with pytest.raises(ValueError):
        clip.put("work", G.CLIP_TEXT, b"x" * (G.CLIPBOARD_MAX + 1))


# --- D_KEYMAP: XKB names dom0 reads from the user's display, setxkbmap's argv in the qube ---

@pytest.mark.parametrize("names", [
    ("evdev", "pc105", "de", "", ""),
    ("evdev", "", "us,de", ",nodeadkeys", "grp:alt_shift_toggle,compose:ralt"),
    ("base", "pc104", "gb", "extd", ""),
])
def test_plain_keymap_names_pass_both_ways(names):
    assert G.unpack_keymap(G.pack_keymap(names)) == names


@pytest.mark.parametrize("names", [
    ("evdev", "pc105", "../../etc/passwd", "", ""),   # a path
    ("evdev", "pc105", "de", "-print", ""),           # would read as an option
    ("evdev", "pc105", "de", "", "a;reboot"),         # a shell character
    ("evdev", "pc105", "de", "", "x" * 65),           # too long
    ("evdev", "pc105", "", "", ""),                   # no layout
    ("", "pc105", "de", "", ""),                      # no rules
    ("evdev", "pc105", "de", ""),                     # four names
    ("evdev", "pc105", "d\u00e9", "", ""),            # not ASCII
])
def test_odd_keymap_names_are_refused(names):
    with pytest.raises(Violation):
        G.check_keymap_names(names)


def test_keymap_payload_bounds():
    with pytest.raises(Violation):
        G.unpack_keymap("evdev\0pc105\0d\u00e9\0\0".encode("utf-8"))
    with pytest.raises(Violation):
        G.unpack_keymap(b"evdev\0pc105\0de\0\0\0extra")
    G.check_header(G.D_KEYMAP, 0, 0, G.MAX_SIZE[G.D_KEYMAP], G.FROM_DOM0)
    with pytest.raises(Violation):
        G.check_header(G.D_KEYMAP, 0, 0, G.MAX_SIZE[G.D_KEYMAP] + 1, G.FROM_DOM0)
    with pytest.raises(Violation):
        G.check_header(G.D_KEYMAP, 0, 7, 10, G.FROM_DOM0)   # about the connection: window 0
