"""Helpers of the file pool tests: pools, volumes, and image content checked through QEMU."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bulkhead.storage import file_volume
from bulkhead.storage.file_pool import FilePool
from bulkhead.storage.file_volume import FileVolume
from bulkhead.storage.pool import VolumeConfig

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (package qemu-utils)")

MiB = 1024 * 1024
SIZE = 4 * MiB
POOL = "varlibqubes"
CHUNK = 64 * 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- image content, through QEMU's own block layer --------------------------------------

def qemu_io(img: Path, command: str) -> subprocess.CompletedProcess[str]:
    # Read-only (-r), without taking QEMU's image lock (-U): checking never changes an image.
    return subprocess.run(["qemu-io", "-r", "-U", "-c", command, str(img)],
                          capture_output=True, text=True, timeout=30)


def write_pattern(img: Path, byte: int, offset: int = 0, length: int = CHUNK) -> None:
    r = subprocess.run(["qemu-io", "-c", f"write -P {byte:#x} {offset} {length}", str(img)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout


def has_pattern(img: Path, byte: int, offset: int = 0, length: int = CHUNK) -> bool:
    r = qemu_io(img, f"read -P {byte:#x} {offset} {length}")
    out = r.stdout + r.stderr
    if "Pattern verification failed" in out:
        return False
    # Anything else than a clean read (an image qemu-io cannot open...) is an error, so a
    # "not has_pattern" assertion can never pass vacuously.
    assert r.returncode == 0 and f"read {length}/{length} bytes" in out, out
    return True


def info(img: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def check_image(img: Path) -> None:
    """The image is a consistent qcow2 (what a crash must never break)."""
    r = subprocess.run(["qemu-img", "check", "-U", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- volumes ------------------------------------------------------------------------

def make_pool(tmp_path: Path, resolver: Any = None, background: bool = False) -> FilePool:
    # Merges in the foreground by default: a test looks at the chain as soon as stop returns.
    pool = FilePool(POOL, tmp_path / "pool", resolver=resolver, merge_in_background=background)
    run(pool.setup())
    return pool


def private(pool: FilePool, vid: str = "appvms/work/private", keep: int = 1,
            size: int = SIZE) -> FileVolume:
    return pool.init_volume(vid, VolumeConfig(name="private", pool=POOL, size=size,
                                              save_on_stop=True, revisions_to_keep=keep))


def template_root(pool: FilePool, keep: int = 1) -> FileVolume:
    return pool.init_volume("vm-templates/debian-12/root", VolumeConfig(
        name="root", pool=POOL, size=SIZE, save_on_stop=True, revisions_to_keep=keep))


def app_root(pool: FilePool, size: int = MiB) -> FileVolume:
    return pool.init_volume("appvms/work/root", VolumeConfig(
        name="root", pool=POOL, size=size, snap_on_start=True,
        source=f"{POOL}:vm-templates/debian-12/root"))


def volatile(pool: FilePool, rw: bool = True) -> FileVolume:
    return pool.init_volume("appvms/work/volatile", VolumeConfig(
        name="volatile", pool=POOL, size=SIZE, rw=rw, ephemeral=True))


def session(vol: FileVolume, byte: int, offset: int = 0) -> None:
    """One run of the qube: start, the guest writes ``byte``, stop (commit)."""
    spec = run(vol.start())
    write_pattern(spec.path, byte, offset)
    run(stop_and_merge(vol))


async def stop_and_merge(vol: FileVolume) -> None:
    """Stop, then wait for the background merge it started (a loop must not end under it)."""
    await vol.stop()
    await vol.pool.wait_merges()


def image(vol: FileVolume, n: int) -> Path:
    """The committed image number ``n`` of ``vol`` (revision ``n``)."""
    [path] = [p for k, p in vol._images() if k == n]
    return path


def chain(vol: FileVolume) -> list[str | None]:
    """Each committed image's backing file name, oldest first."""
    return [info(p).get("backing-filename") for _, p in vol._images()]


def tmp_files(vol: FileVolume) -> list[str]:
    return [p.name for p in vol.dir.iterdir() if p.name.startswith(file_volume.TMP_PREFIX)]
