"""Thin async wrappers over ``qemu-img``, the one tool that edits our disk images."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from ..errors import StoragePoolException

QEMU_IMG = "qemu-img"


async def run(*args: str) -> str:
    """Run ``qemu-img`` with ``args`` (never through a shell); raise with its message on failure."""
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        # A cancelled operation (a background merge a start overtakes) must not go on
        # writing behind our back: stop it, and wait so its image lock is released.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise StoragePoolException(f"qemu-img {args[0]} failed: {msg}")
    return out.decode(errors="replace")


async def create(path: Path, size: int | None, backing: Path | str | None = None) -> None:
    """A new qcow2 image, empty or as a copy-on-write overlay on ``backing``
    (``size`` None: the overlay has its backing image's size)."""
    args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    await run(*args)


async def flatten(src: Path, dst: Path) -> None:
    """Copy ``src`` and everything it is backed by into one standalone qcow2 ``dst``."""
    await run("convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536", str(src), str(dst))


async def commit_into_backing(path: Path) -> None:
    """Write ``path``'s own clusters into its backing image, leaving ``path`` itself
    untouched (``-d``: not emptied), so that both stay whole images while it runs."""
    await run("commit", "-q", "-d", "-f", "qcow2", str(path))


async def absorb_backing(path: Path) -> None:
    """Make ``path`` stand alone by copying into it what it read from its (standalone)
    backing image.  What ``path`` shows never changes: each copied cluster holds what
    was read through the backing, and the header drops the backing name last."""
    await run("rebase", "-q", "-f", "qcow2", "-b", "", str(path))


async def backing_of(path: Path) -> str | None:
    """The backing file name recorded in the qcow2 image ``path`` (as written), or None."""
    info = json.loads(await run("info", "--output=json", "-f", "qcow2", "-U", str(path)))
    return info.get("backing-filename") or None


async def rebase_unsafe(path: Path, backing: str) -> None:
    """Rewrite only the backing file name in ``path``'s header (no data is copied:
    the caller vouches that ``backing`` holds the same content under a new name)."""
    await run("rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(path))


QCOW2_MAGIC = b"QFI\xfb"


def image_format(path: Path) -> str:
    """"qcow2" or "raw", from the file's first bytes -- never qemu-img's guess, which
    would read a raw disk that happens to hold a qcow2 header (a qube can write
    one) as qcow2, backing file and all."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


async def convert_from(src: Path, dst: Path) -> None:
    """Import a raw or qcow2 image as a standalone qcow2.

    A qcow2 source must not name a backing file: importing would copy in the
    content of whatever file that names (another qube's volume, any file dom0
    can read)."""
    fmt = image_format(src)
    if fmt == "qcow2":
        info = json.loads(await run("info", "--output=json", "-f", "qcow2", "-U", str(src)))
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise StoragePoolException(
                f"refusing to import {src}: it is a qcow2 image backed by "
                f"{info.get('backing-filename')!r}; flatten it first (qemu-img convert)")
    await run("convert", "-q", "-f", fmt, "-O", "qcow2", "-o", "cluster_size=65536",
              str(src), str(dst))


async def resize(path: Path, size: int) -> None:
    await run("resize", "-q", str(path), str(size))


async def virtual_size(path: Path) -> int:
    info = json.loads(await run("info", "--output=json", "-U", str(path)))
    return int(info["virtual-size"])


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
