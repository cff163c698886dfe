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
    out, err = await proc.communicate()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise StoragePoolException(f"qemu-img {args[0]} failed: {msg}")
    return out.decode(errors="replace")


async def create(path: Path, size: int, backing: Path | str | None = None) -> None:
    """A new qcow2 image, empty or as a copy-on-write overlay on ``backing``."""
    args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    await run(*args, str(path), str(size))


async def flatten(src: Path, dst: Path) -> None:
    """Copy ``src`` and everything it is backed by into one standalone qcow2 ``dst``."""
    await run("convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536", str(src), str(dst))


async def convert_from(src: Path, dst: Path, src_fmt: str | None = None) -> None:
    """Import any image QEMU reads (raw, qcow2, ...) as a standalone qcow2."""
    args = ["convert", "-q"]
    if src_fmt:
        args += ["-f", src_fmt]
    await run(*args, "-O", "qcow2", "-o", "cluster_size=65536", str(src), str(dst))


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
