"""qvm-run as a real process against a fake daemon on a unix socket: pipes, exit code, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from bulkhead.guest import protocol as p

REPLIES = {
    b"admin.vm.List+ dom0 name dom0\x00": b"0\x00work class=AppVM state=Running\n",
    b"admin.vm.CurrentState+ dom0 name work\x00": b"0\x00power_state=Running",
    b"admin.vm.property.Get+default_user dom0 name work\x00": b"0\x00default=True type=str user",
}


class FakeDaemon:
    """Answers Admin API requests from REPLIES; serves Run streams: echo stdin, exit 7.

    A SIGNAL frame ends the command with 128 + the signal number, as a shell would report.
    """

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.signals: list[int] = []
        self.started = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            header = b""
            while not header.endswith(b"\x00"):
                header += conn.recv(1)
            if header.startswith(b"bulkhead.vm.Run "):
                self._run(conn)
                return
            while conn.recv(4096):
                pass
            conn.sendall(REPLIES[header])

    def _run(self, conn: socket.socket) -> None:
        reader = p.FrameReader(p.FROM_DOM0)
        self.started.set()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for mtype, _, payload in reader.feed(data):
                if mtype == p.STDIN and payload:
                    conn.sendall(p.pack(p.STDOUT, 1, payload))
                elif mtype == p.STDIN:
                    conn.sendall(p.pack(p.STDOUT, 1) + p.pack(p.EXIT, 1, p.i32(7)))
                    return
                elif mtype == p.SIGNAL:
                    signum = p.parse_u32(payload)
                    self.signals.append(signum)
                    conn.sendall(p.pack(p.EXIT, 1, p.i32(128 + signum)))
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def daemon() -> Iterator[tuple[FakeDaemon, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="bh-proc-") as d:
        path = Path(d) / "qubesd.sock"
        fake = FakeDaemon(path)
        env = dict(os.environ, BULKHEAD_SOCKET=str(path))
        yield fake, env
        fake.close()


def test_pipe_in_pipe_out_exit_code(daemon):
    _, env = daemon
    data = os.urandom(200_000)
    proc = subprocess.run([sys.executable, "-m", "bulkhead.tools.qvm_run", "-p", "work", "cat"],
                          input=data, capture_output=True, env=env, timeout=30)
    assert proc.returncode == 7
    assert proc.stdout == data
    assert proc.stderr == b""


def test_ctrl_c_is_forwarded_to_the_command(daemon):
    fake, env = daemon
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead.tools.qvm_run", "-p", "work", "sleep 100"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert fake.started.wait(20)
        time.sleep(0.2)  # let the client install its handlers
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)  # stdin stays open: only the signal can end the command
        err = proc.stderr.read()
    finally:
        proc.kill()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    assert fake.signals == [signal.SIGINT]
    assert proc.returncode == 128 + signal.SIGINT, err
