"""The ``bulkhead.vm.Run`` stream client against a fake daemon on a real unix socket."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bulkhead import errors
from bulkhead.client import App, Connection, RunError
from bulkhead.client.run import run_stream
from bulkhead.guest import protocol as p


class FakeRunDaemon:
    """Serves one Run connection: records the header and the frames, then runs ``behaviour``."""

    def __init__(self, path: Path, behaviour: Callable[["FakeRunDaemon"], None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.behaviour = behaviour
        self.header = b""
        self.raw = b""          # every byte received after the header
        self.frames: list[tuple[int, int, bytes]] = []
        self.conn: socket.socket | None = None
        self.reader = p.FrameReader(p.FROM_DOM0)
        self._taken = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.conn, _ = self.listener.accept()
            with self.conn:
                buf = b""
                while b"\0" not in buf:
                    chunk = self.conn.recv(1)
                    if not chunk:
                        return
                    buf += chunk
                self.header = buf
                self.behaviour(self)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame from the client (None at EOF)."""
        assert self.conn is not None
        while self._taken == len(self.frames):
            data = self.conn.recv(65536)
            if not data:
                return None
            self.raw += data
            self.frames += self.reader.feed(data)
        self._taken += 1
        return self.frames[self._taken - 1]

    def send(self, mtype: int, payload: bytes = b"") -> None:
        assert self.conn is not None
        self.conn.sendall(p.pack(mtype, 1, payload))

    def join(self) -> None:
        self.thread.join(10)
        self.listener.close()
        if self.error:
            raise self.error


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bh-run-") as d:
        yield Path(d) / "qubesd.sock"


def echo_then_exit(code: int) -> Callable[[FakeRunDaemon], None]:
    """Echo stdin to stdout (upper-cased to stderr too) until EOF of stdin, then EXIT(code)."""
    def behaviour(d: FakeRunDaemon) -> None:
        first = d.next_frame()
        assert first is not None and first[0] in (p.EXEC, p.SERVICE)
        while True:
            frame = d.next_frame()
            assert frame is not None, "client closed before stdin EOF"
            mtype, _, payload = frame
            assert mtype == p.STDIN
            if not payload:
                break
            d.send(p.STDOUT, payload)
        d.send(p.STDERR, b"done\n")
        d.send(p.STDOUT)
        d.send(p.STDERR)
        d.send(p.EXIT, p.i32(code))
    return behaviour


def test_exact_request_bytes_and_relay(sock_path):
    daemon = FakeRunDaemon(sock_path, echo_then_exit(3))
    out, err = io.BytesIO(), io.BytesIO()
    code = run_stream(Connection(sock_path), "work", "cat", "user",
                      stdin=io.BytesIO(b"hello\n"), stdout=out, stderr=err)
    daemon.join()
    assert code == 3
    assert out.getvalue() == b"hello\n"
    assert err.getvalue() == b"done\n"
    assert daemon.header == b"bulkhead.vm.Run dom0 name work\x00"
    exec_frame = (p.EXEC.to_bytes(2, "little") + b"\0\0" + (1).to_bytes(4, "little")
                  + len(b"user\0cat").to_bytes(4, "little") + b"user\0cat")
    assert daemon.raw.startswith(exec_frame)
    assert daemon.frames[:3] == [(p.EXEC, 1, b"user\0cat"), (p.STDIN, 1, b"hello\n"), (p.STDIN, 1, b"")]


def test_service_frame(sock_path):
    daemon = FakeRunDaemon(sock_path, echo_then_exit(0))
    run_stream(Connection(sock_path), "work", "qubes.Filecopy+x", "root", stdin=None, service=True)
    daemon.join()
    assert daemon.frames[0] == (p.SERVICE, 1, b"root\0qubes.Filecopy+x\0dom0")


def test_no_stdin_sends_eof_at_once(sock_path):
    daemon = FakeRunDaemon(sock_path, echo_then_exit(0))
    assert run_stream(Connection(sock_path), "work", "true", "user", stdin=None) == 0
    daemon.join()
    assert daemon.frames[1] == (p.STDIN, 1, b"")


def test_refused_request_raises_the_daemons_exception(sock_path):
    def refuse(d: FakeRunDaemon) -> None:
        d.conn.sendall(b"2\x00QubesVMNotFoundError\x00\x00No such domain: 'nope'\x00")

    daemon = FakeRunDaemon(sock_path, refuse)
    with pytest.raises(errors.QubesVMNotFoundError, match="No such domain: 'nope'"):
        run_stream(Connection(sock_path), "nope", "true", "user", stdin=None)
    daemon.join()


def test_error_frame_raises_run_error_with_exit_code(sock_path):
    def cannot_start(d: FakeRunDaemon) -> None:
        d.next_frame()
        d.send(p.ERROR, b"no such user: bob")
        d.send(p.EXIT, p.i32(127))

    daemon = FakeRunDaemon(sock_path, cannot_start)
    with pytest.raises(RunError) as info:
        run_stream(Connection(sock_path), "work", "true", "bob", stdin=None)
    daemon.join()
    assert str(info.value) == "no such user: bob" and info.value.exit_code == 127


def test_stream_ending_without_exit_is_an_error(sock_path):
    def vanish(d: FakeRunDaemon) -> None:
        d.next_frame()
        d.send(p.STDOUT, b"partial")

    daemon = FakeRunDaemon(sock_path, vanish)
    with pytest.raises(errors.QubesDaemonCommunicationError, match="before the command's exit code"):
        run_stream(Connection(sock_path), "work", "true", "user", stdin=None)
    daemon.join()


def test_negative_exit_code_and_ok_prefix_tolerated(sock_path):
    def ok_then_frames(d: FakeRunDaemon) -> None:
        d.next_frame()
        d.conn.sendall(b"0\x00")
        d.send(p.EXIT, p.i32(-1))

    daemon = FakeRunDaemon(sock_path, ok_then_frames)
    assert run_stream(Connection(sock_path), "work", "true", "user", stdin=None) == -1
    daemon.join()


def test_large_data_both_ways_does_not_deadlock(sock_path):
    """The daemon writes output while the client still has input to send."""
    data = os.urandom(3 * 1024 * 1024)
    daemon = FakeRunDaemon(sock_path, echo_then_exit(0))
    out = io.BytesIO()
    code = run_stream(Connection(sock_path), "work", "cat", "user",
                      stdin=io.BytesIO(data), stdout=out)
    daemon.join()
    assert code == 0 and out.getvalue() == data


def test_stdin_from_a_pipe_and_from_a_regular_file(sock_path, tmp_path):
    daemon = FakeRunDaemon(sock_path, echo_then_exit(0))
    r, w = os.pipe()
    os.write(w, b"through a pipe\n")
    os.close(w)
    out = io.BytesIO()
    with os.fdopen(r, "rb") as stdin:
        run_stream(Connection(sock_path), "work", "cat", "user", stdin=stdin, stdout=out)
    daemon.join()
    assert out.getvalue() == b"through a pipe\n"

    os.unlink(sock_path)
    daemon = FakeRunDaemon(sock_path, echo_then_exit(0))
    f = tmp_path / "input"
    f.write_bytes(b"from a file\n" * 1000)
    out = io.BytesIO()
    with open(f, "rb") as stdin:  # epoll cannot watch a regular file: read directly
        run_stream(Connection(sock_path), "work", "cat", "user", stdin=stdin, stdout=out)
    daemon.join()
    assert out.getvalue() == b"from a file\n" * 1000


def test_vm_run_uses_default_user_and_collects_output(sock_path):
    class PropertiesToo(Connection):
        """Real socket for the stream; the one property call answered here."""
        def request(self, dest, method, arg=None, payload=b""):
            assert (dest, method, arg) == ("work", "admin.vm.property.Get", "default_user")
            return b"0\x00default=True type=str alice"

    daemon = FakeRunDaemon(sock_path, echo_then_exit(5))
    vm = App(PropertiesToo(sock_path)).domains.get_blind("work")
    result = vm.run("cat", input=b"x")
    daemon.join()
    assert (result.returncode, result.stdout, result.stderr) == (5, b"x", b"done\n")
    assert daemon.frames[0] == (p.EXEC, 1, b"alice\0cat")


@pytest.mark.parametrize("command,user", [("", "user"), ("a\0b", "user"), ("ls", ""), ("ls", "u" * 40)])
def test_invalid_requests_are_refused_before_connecting(command, user):
    with pytest.raises(errors.QubesValueError):
        run_stream(Connection("/nonexistent"), "work", command, user)
