"""dom0's global clipboard: one buffer for the whole desktop, as Qubes has it.

Every qube's GUI daemon (one process each) reads and writes it, so it lives in
files in the user's runtime directory (mode 0700): ``clipboard.data`` (the
bytes, opaque: dom0 never parses them, a PNG included) and
``clipboard.meta`` (``source kind size``).  A copy writes both then renames
them in place; a paste *takes* the buffer by renaming it away, so two pastes
racing get it once, and the clipboard is empty afterwards (Qubes' rule: a
copy is pasted once, into one qube).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..guest import gui_protocol as G

KIND_NAMES = {G.CLIP_TEXT: "text", G.CLIP_PNG: "image/png"}


@dataclass(frozen=True)
class Entry:
    source: str
    kind: int
    data: bytes


def default_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/bulkhead-{os.getuid()}"
    return Path(base) / "bulkhead-gui"


class GlobalClipboard:
    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or default_dir()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, source: str, kind: int, data: bytes) -> None:
        if kind not in KIND_NAMES or len(data) > G.CLIPBOARD_MAX:
            raise ValueError("clipboard kind or size out of bounds")
        tmp = self.dir / f"clipboard.data.{os.getpid()}"
        tmp.write_bytes(data)
        meta = self.dir / f"clipboard.meta.{os.getpid()}"
        meta.write_text(f"{source} {kind} {len(data)}\n")
        # The data first: a reader that finds meta finds the matching data (or none).
        os.replace(tmp, self.dir / "clipboard.data")
        os.replace(meta, self.dir / "clipboard.meta")

    def peek(self) -> Entry | None:
        try:
            source, kind, size = (self.dir / "clipboard.meta").read_text().split()
            data = (self.dir / "clipboard.data").read_bytes()
        except (OSError, ValueError):
            return None
        if len(data) != int(size):
            return None
        return Entry(source, int(kind), data)

    def take(self) -> Entry | None:
        """The clipboard's content, emptying it; None if empty (or another paste won)."""
        mine = self.dir / f"clipboard.taken.{os.getpid()}"
        try:
            os.replace(self.dir / "clipboard.meta", mine)
        except FileNotFoundError:
            return None
        try:
            source, kind, size = mine.read_text().split()
            data = (self.dir / "clipboard.data").read_bytes()
        except (OSError, ValueError):
            return None
        finally:
            mine.unlink(missing_ok=True)
        (self.dir / "clipboard.data").unlink(missing_ok=True)
        if len(data) != int(size):
            return None
        return Entry(source, int(kind), data)
