"""A minimal initramfs (cpio "newc") whose /init prints a marker and reboots.

It measures the floor of booting a qube: QEMU plus the kernel up to the first
line of userspace, with nothing of Bulkhead's in between.  ``bench/`` compares
a qube's start to agent-ready against it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MARKER = "BULKHEAD-BARE-READY"
BUSYBOX = Path("/bin/busybox")  # busybox-static: no libraries needed in the initramfs

INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox echo {MARKER} > /dev/ttyS0
/bin/busybox reboot -f
"""


def _entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out = header + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build(dest: Path) -> Path:
    """Write the benchmark initramfs to ``dest`` (needs the host's static busybox)."""
    if not BUSYBOX.exists() or shutil.which("busybox") is None:
        raise FileNotFoundError("a static busybox is needed at /bin/busybox (package busybox-static)")
    entries = [
        ("dev", 0o040755, b""),
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        ("init", 0o100755, INIT.encode()),
    ]
    blob = b"".join(_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(entries))
    blob += _entry("TRAILER!!!", 0, b"", 0)
    blob += b"\0" * (-len(blob) % 512)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(dest)
    return dest
