"""The file-copy stream's two ends on the host: the guest's sender (``qfile-agent``,
compiled from guest/c as the template build does) and the qubes.Filecopy unpacker.
The kernel paths they take (splice into a pipe and out of it) and the plain
read/write they fall back to give the same files; the sender reports what the
target refused without its escape characters."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bulkhead.guest import filecopy
from bulkhead.setup.template import compile_program


@pytest.fixture(scope="module")
def qfile_agent(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bin") / "qfile-agent"
    compile_program("guest/c/qfile-agent.c", out)
    return str(out)


def entry(kind: bytes, name: str, mode: int, size: int) -> bytes:
    """An entry's header and name, as the format in filecopy's documentation says."""
    raw = name.encode()
    return (kind + len(raw).to_bytes(2, "little") + mode.to_bytes(4, "little")
            + size.to_bytes(8, "little") + raw)


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


def _send(qfile_agent: str, paths: list[Path], out_fd: int,
          status: bytes = b"OK\n") -> subprocess.Popen[bytes]:
    """The sender, started with stdout ``out_fd`` and ``status`` waiting on its stdin."""
    r, w = os.pipe()
    os.write(w, status)
    os.close(w)
    try:
        return subprocess.Popen([qfile_agent, *map(str, paths)], stdin=r, stdout=out_fd,
                                stderr=subprocess.PIPE)
    finally:
        os.close(r)


def test_through_a_pipe_the_kernel_moves_the_bytes(tmp_path: Path, qfile_agent: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    paths = _tree(src)
    r, w = os.pipe()
    sender = _send(qfile_agent, paths, w)
    os.close(w)
    try:
        unpacker = _unpack(r, dest)
    finally:
        os.close(r)
    assert sender.wait(30) == 0, sender.stderr.read()
    assert unpacker.count == 6 and unpacker.splice   # splice stayed in use
    _same(src, dest)


def test_from_a_plain_file_it_reads_and_writes(tmp_path: Path, qfile_agent: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    paths = _tree(src)
    stream = tmp_path / "stream"
    fd = os.open(stream, os.O_WRONLY | os.O_CREAT, 0o600)
    assert _send(qfile_agent, paths, fd).wait(30) == 0   # sendfile, not splice: not a pipe
    os.close(fd)
    fd = os.open(stream, os.O_RDONLY)
    try:
        unpacker = _unpack(fd, dest)
    finally:
        os.close(fd)
    assert not unpacker.splice                         # not a pipe: fell back
    _same(src, dest)


def test_the_sender_reports_a_refusal_without_escapes(tmp_path: Path, qfile_agent: str) -> None:
    (tmp_path / "f").write_bytes(b"data")
    sender = _send(qfile_agent, [tmp_path / "f"], subprocess.DEVNULL,
                   status=b"ERROR: \x1b]0;owned\x07refused\n")
    assert sender.wait(30) == 1
    assert sender.stderr.read() == (b"qvm-copy: the target refused the transfer: "
                                    b"ERROR: _]0;owned_refused\n")


def test_the_sender_names_what_it_cannot_send(tmp_path: Path, qfile_agent: str) -> None:
    for path, why in ((tmp_path / "missing", b"No such file or directory"),
                      (Path("/dev/null"), b"not a regular file, directory or symlink")):
        sender = _send(qfile_agent, [path], subprocess.DEVNULL)
        assert sender.wait(30) == 1
        assert sender.stderr.read() == b"qvm-copy: %s: %s\n" % (str(path).encode(), why)
    sender = _send(qfile_agent, [], subprocess.DEVNULL)
    assert sender.wait(30) == 2


def test_a_stream_cut_short_leaves_no_partial_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); dest.mkdir()
    (src / "big").write_bytes(b"x" * 200_000)
    r, w = os.pipe()
    os.write(w, filecopy.MAGIC + entry(b"F", "big", 0o644, 200_000) + b"x" * 1000)
    os.close(w)
    with pytest.raises(filecopy.Refused, match="ended in the middle"):
        _unpack(r, dest)
    os.close(r)
    assert list(dest.iterdir()) == []
