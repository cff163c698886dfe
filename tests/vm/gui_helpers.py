"""The user's display for GUI tests: a real Xvfb, python-xlib to look at it, xdotool to type.

A test's "desktop" is an Xvfb started here (no window manager: dom0's GUI
daemon places its windows where the qube says, and focus is set with
``xdotool windowfocus``).  Screens are read back with GetImage: the frame
colour of a window is checked pixel by pixel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

SCREEN = (1280, 800)


class UserDisplay:
    def __init__(self, number: int) -> None:
        self.name = f":{number}"
        self.proc = subprocess.Popen(
            ["Xvfb", self.name, "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp",
             "-noreset"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from Xlib import display
        deadline = time.monotonic() + 15
        while True:
            try:
                self.d = display.Display(self.name)
                break
            except Exception:  # noqa: BLE001 -- not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.root = self.d.screen().root

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return dict(base, DISPLAY=self.name)

    def close(self) -> None:
        try:
            self.d.close()
        except Exception:  # noqa: BLE001
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def windows(self, prefix: str = "") -> list[Any]:
        """Mapped top-level windows whose title starts with ``prefix``."""
        from Xlib import X
        out = []
        for w in self.root.query_tree().children:
            try:
                if w.get_attributes().map_state != X.IsViewable:
                    continue
                name = w.get_full_property(self.d.intern_atom("_NET_WM_NAME"), 0)
                title = name.value.decode("utf-8", "replace") if name is not None else \
                    (w.get_wm_name() or "")
            except Exception:  # noqa: BLE001 -- gone meanwhile
                continue
            if isinstance(title, bytes):
                title = title.decode("latin-1")
            if title.startswith(prefix):
                out.append(w)
        return out

    def title(self, w: Any) -> str:
        name = w.get_full_property(self.d.intern_atom("_NET_WM_NAME"), 0)
        return name.value.decode("utf-8", "replace") if name is not None else ""

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or predicate}")

    def pixel(self, x: int, y: int) -> int:
        """The 0xRRGGBB colour at (x, y) on the screen."""
        from Xlib import X
        img = self.root.get_image(x, y, 1, 1, X.ZPixmap, 0xFFFFFFFF)
        b, g, r = img.data[0], img.data[1], img.data[2]
        return (r << 16) | (g << 8) | b

    def geometry(self, w: Any) -> tuple[int, int, int, int]:
        g = w.get_geometry()
        return g.x, g.y, g.width, g.height

    def focus(self, prefix: str, timeout: float = 60) -> Any:
        """Focus the window titled ``prefix...``, found afresh if the one found went
        (a qube's window can be remade while its GUI agent reconnects)."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.wait_for(lambda: self.windows(prefix), max(1.0, deadline - time.monotonic()),
                              f"a {prefix} window")[0]
            try:
                self.xdotool("windowfocus", "--sync", str(w.id))
                return w
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=dict(os.environ, DISPLAY=self.name), check=True,
                       timeout=30)

    def screenshot_png(self, path: Path) -> None:
        """The whole screen as a PNG (written here: zlib, no image library needed)."""
        import struct
        import zlib
        from Xlib import X
        w, h = SCREEN
        data = self.root.get_image(0, 0, w, h, X.ZPixmap, 0xFFFFFFFF).data
        rows = bytearray()
        for y in range(h):
            rows.append(0)
            line = data[y * w * 4:(y + 1) * w * 4]
            rgb = bytearray(w * 3)
            rgb[0::3], rgb[1::3], rgb[2::3] = line[2::4], line[1::4], line[0::4]
            rows += rgb

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(
                ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b""))
        path.write_bytes(png)


def start_daemon(display: UserDisplay, env: dict[str, str], log_dir: Path, *extra: str
                 ) -> subprocess.Popen[bytes]:
    """qvm-start-daemon for the test display (this checkout's, through PYTHONPATH)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "qvm-start-daemon.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "bulkhead.tools.qvm_start_daemon",
                             "--log-dir", str(log_dir), "--clipboard-dir", str(log_dir / "clip"),
                             *extra], env=display.env(env), stdout=out, stderr=out)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
