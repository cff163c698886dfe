"""The file-copy stream's two ends (the guest's qvm-copy sender and qubes.Filecopy
unpacker) on the host: the kernel paths they take (sendfile into a pipe, splice
out of it) and the plain read/write they fall back to give the same files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from bulkhead.guest import filecopy


def _tree(src: Path) -> list[Path]:
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))   # > SEND_MAX
    (src / "dir" / "sub" / "empty").write_bytes(b"")
    (src / "dir" / "link").symlink_to("a.bin")
    (src / "one.txt").write_text("one\n")
    return [src / "dir", src / "one.txt"]


def _unpack(stream_fd: int, dest: Path) -> filecopy.Unpacker:
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    unpacker = filecopy.Unpacker(root, filecopy.DEFAULT_LIMIT)
    unpacker.unpack(stream_fd)
    return unpacker


def _same(src: Path, dest: Path) -> None:
    assert (dest / "dir" / "a.bin").read_bytes() == (src / "dir" / "a.bin").read_bytes()
    assert (dest / "dir" / "sub" / "empty").read_bytes() == b""
    assert os.readlink(dest / "dir" / "link") == "a.bin"
    assert (dest / "one.txt").read_text() == "one\n"


def test_through_a_pipe_the_kernel_moves_the_bytes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    paths = _tree(src)
    r, w = os.pipe()

    def sender() -> None:
        try:
            filecopy.send([str(p) for p in paths], w)
        finally:
            os.close(w)
    t = threading.Thread(target=sender)
    t.start()
    try:
        unpacker = _unpack(r, dest)
    finally:
        t.join()
        os.close(r)
    assert unpacker.count == 6 and unpacker.splice   # splice stayed in use
    _same(src, dest)


def test_from_a_plain_file_it_reads_and_writes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    paths = _tree(src)
    stream = tmp_path / "stream"
    fd = os.open(stream, os.O_WRONLY | os.O_CREAT, 0o600)
    filecopy.send([str(p) for p in paths], fd)
    os.close(fd)
    fd = os.open(stream, os.O_RDONLY)
    try:
        unpacker = _unpack(fd, dest)
    finally:
        os.close(fd)
    assert not unpacker.splice                         # not a pipe: fell back
    _same(src, dest)


def test_a_stream_cut_short_leaves_no_partial_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    (src / "big").write_bytes(b"x" * 200_000)
    r, w = os.pipe()
    os.write(w, filecopy.MAGIC + filecopy._entry(b"F", "big", 0o644, 200_000) + b"x" * 1000)
    os.close(w)
    with pytest.raises(filecopy.Refused, match="ended in the middle"):
        _unpack(r, dest)
    os.close(r)
    assert list(dest.iterdir()) == []
