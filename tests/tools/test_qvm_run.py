"""qvm-run: the Run stream as the tool drives it (frames checked on a fake daemon end)."""

from __future__ import annotations

import io
import socket
import sys

import pytest

from bulkhead.guest import protocol as p
from bulkhead.tools import qvm_run
from bulkhead.tools.qvm_run import EscapeFilter
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")


def run_header(vm: str) -> bytes:
    return f"bulkhead.vm.Run dom0 name {vm}".encode() + b"\x00"


class RunHandler:
    """Plays the daemon's end of one Run stream: records frames, answers with ``replies``."""

    def __init__(self, replies: list[tuple[int, bytes]], echo_stdin: bool = False) -> None:
        self.replies = replies
        self.echo_stdin = echo_stdin
        self.frames: list[tuple[int, int, bytes]] = []

    def __call__(self, sock: socket.socket) -> None:
        reader = p.FrameReader(p.FROM_DOM0)
        buf = b""
        while b"\x00" not in buf:
            buf += sock.recv(1)
        # read frames until stdin's end (the command's input is complete)
        while not any(t == p.STDIN and not data for t, _, data in self.frames):
            chunk = sock.recv(65536)
            if not chunk:
                break
            self.frames += reader.feed(chunk)
        if self.echo_stdin:
            stdin = b"".join(d for t, _, d in self.frames if t == p.STDIN)
            sock.sendall(p.pack(p.STDOUT, 1, stdin))
        for mtype, payload in self.replies:
            sock.sendall(p.pack(mtype, 1, payload))

    @property
    def request(self) -> tuple[int, bytes]:
        return self.frames[0][0], self.frames[0][2]


def exit_with(code: int, out: bytes = b"", err: bytes = b"") -> list[tuple[int, bytes]]:
    replies = []
    if out:
        replies.append((p.STDOUT, out))
    if err:
        replies.append((p.STDERR, err))
    return replies + [(p.STDOUT, b""), (p.STDERR, b""), (p.EXIT, p.i32(code))]


def running_vm(conn, name: str = "work", state: str = "Running", user: str = "user") -> None:
    conn.expected_calls[LIST] = vm_list(f"{name} class=AppVM state={state}")
    conn.expected_calls[(name, "admin.vm.CurrentState", None, b"")] = f"0\x00power_state={state}".encode()
    conn.expected_calls[(name, "admin.vm.property.Get", "default_user", b"")] = (
        f"0\x00default=True type=str {user}".encode())


@pytest.fixture
def stdin(monkeypatch):
    def set_stdin(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return set_stdin


def test_pass_io_relays_and_returns_exit_code(app, conn, capsysbinary, stdin):
    running_vm(conn)
    handler = RunHandler(exit_with(3, err=b"warning\n"), echo_stdin=True)
    conn.stream_handlers[run_header("work")] = handler
    stdin(b"some-data\n")
    assert qvm_run.main(["-p", "work", "cat"], app=app) == 3
    out = capsysbinary.readouterr()
    assert out.out == b"some-data\n"
    assert out.err == b"warning\n"
    assert handler.request == (p.EXEC, b"user\x00cat")
    assert (p.STDIN, 1, b"some-data\n") in handler.frames
    conn.assert_all_called()


def test_without_pass_io_output_is_discarded_and_progress_shown(app, conn, capsysbinary):
    running_vm(conn)
    handler = RunHandler(exit_with(0, out=b"ignored"))
    conn.stream_handlers[run_header("work")] = handler
    assert qvm_run.main(["work", "touch /tmp/x"], app=app) == 0
    out = capsysbinary.readouterr()
    assert out.out == b""
    assert out.err == b"Running 'touch /tmp/x' on work\n"
    # no input: stdin's end is sent right after the command
    assert handler.frames[:2] == [(p.EXEC, 1, b"user\x00touch /tmp/x"), (p.STDIN, 1, b"")]


def test_halted_qube_is_started_first(app, conn):
    running_vm(conn, state="Halted")
    conn.expected_calls[("work", "admin.vm.Start", None, b"")] = b"0\x00"
    conn.stream_handlers[run_header("work")] = RunHandler(exit_with(0))
    assert qvm_run.main(["-q", "work", "true"], app=app) == 0
    conn.assert_all_called()


def test_no_autostart_refuses_a_halted_qube(app, conn, capsys):
    running_vm(conn, state="Halted")
    assert qvm_run.main(["--no-autostart", "work", "true"], app=app) == 1
    assert capsys.readouterr().err == "qvm-run: error: qube 'work' is not running\n"
    assert ("work", "admin.vm.Start", None, b"") not in conn.calls


def test_user_option_and_arguments_without_shell(app, conn, stdin):
    running_vm(conn)
    del conn.expected_calls[("work", "admin.vm.property.Get", "default_user", b"")]
    conn.expected_calls[("work", "admin.vm.feature.Get", "vmexec", b"")] = error(
        "QubesFeatureNotFoundError", "Feature not set for domain work: vmexec")
    handler = RunHandler(exit_with(0))
    conn.stream_handlers[run_header("work")] = handler
    stdin(b"")
    assert qvm_run.main(["-p", "-u", "root", "work", "--", "ls", "-a", "x y"], app=app) == 0
    assert handler.request == (p.EXEC, b"root\x00ls -a 'x y'")
    handler = conn.stream_handlers[run_header("work")] = RunHandler(exit_with(0))
    assert qvm_run.main(["-p", "-u", "root", "--no-shell", "work", "rm -rf /"], app=app) == 0
    assert handler.request == (p.EXEC, b"root\x00'rm -rf /'")


def test_service(app, conn, stdin):
    running_vm(conn)
    handler = RunHandler(exit_with(0))
    conn.stream_handlers[run_header("work")] = handler
    stdin(b"")
    assert qvm_run.main(["-p", "--service", "work", "qubes.Filecopy+arg"], app=app) == 0
    assert handler.request == (p.SERVICE, b"user\x00qubes.Filecopy+arg\x00dom0")


def test_command_that_cannot_start(app, conn, capsys):
    running_vm(conn)
    conn.stream_handlers[run_header("work")] = RunHandler([(p.ERROR, b"no such user: bob"),
                                                          (p.EXIT, p.i32(127))])
    assert qvm_run.main(["-q", "-u", "bob", "work", "true"], app=app) == 127
    assert capsys.readouterr().err == "qvm-run: error: work: no such user: bob\n"


def test_refused_stream_reports_daemon_error(app, conn, capsys):
    running_vm(conn)

    def refuse(sock: socket.socket) -> None:
        while b"\x00" not in sock.recv(1):
            pass
        sock.sendall(error("PermissionDenied", "qvm-run is not allowed here"))
    conn.stream_handlers[run_header("work")] = refuse
    assert qvm_run.main(["-q", "work", "true"], app=app) == 1
    assert capsys.readouterr().err == "qvm-run: error: qvm-run is not allowed here\n"


def test_all_runs_everywhere_but_dom0_and_takes_highest_code(app, conn):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running", "a class=AppVM state=Running",
                                        "b class=AppVM state=Running", "c class=AppVM state=Running")
    for name, code in (("a", 0), ("b", 4)):
        conn.expected_calls[(name, "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Running"
        conn.expected_calls[(name, "admin.vm.property.Get", "default_user", b"")] = (
            b"0\x00default=True type=str user")
        conn.stream_handlers[run_header(name)] = RunHandler(exit_with(code))
    assert qvm_run.main(["-q", "--all", "--exclude", "c", "sync"], app=app) == 4
    conn.assert_all_called()


def test_pass_io_with_several_qubes_is_refused(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Running", "b class=AppVM state=Running")
    assert qvm_run.main(["-p", "--all", "true"], app=app) == 2
    assert "--pass-io cannot be used when more than 1 qube is chosen" in capsys.readouterr().err


def test_dispvm_is_created_used_and_killed(app, conn):
    conn.expected_calls[("default-dvm", "admin.vm.CreateDisposable", None, b"")] = b"0\x00disp42"
    conn.expected_calls[("disp42", "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Halted"
    conn.expected_calls[("disp42", "admin.vm.Start", None, b"")] = b"0\x00"
    conn.expected_calls[("disp42", "admin.vm.property.Get", "default_user", b"")] = (
        b"0\x00default=True type=str user")
    conn.expected_calls[("disp42", "admin.vm.Kill", None, b"")] = b"0\x00"
    conn.stream_handlers[run_header("disp42")] = RunHandler(exit_with(0))
    assert qvm_run.main(["-q", "--dispvm=default-dvm", "firefox"], app=app) == 0
    conn.assert_all_called()


def test_dispvm_default_template(app, conn):
    conn.expected_calls[("dom0", "admin.vm.CreateDisposable", None, b"")] = b"0\x00disp7"
    conn.expected_calls[("disp7", "admin.vm.CurrentState", None, b"")] = b"0\x00power_state=Running"
    conn.expected_calls[("disp7", "admin.vm.property.Get", "default_user", b"")] = (
        b"0\x00default=True type=str user")
    conn.expected_calls[("disp7", "admin.vm.Kill", None, b"")] = error("QubesVMNotStartedError", "gone")
    handler = RunHandler(exit_with(0))
    conn.stream_handlers[run_header("disp7")] = handler
    assert qvm_run.main(["-q", "--dispvm", "xterm"], app=app) == 0
    assert handler.request == (p.EXEC, b"user\x00xterm")


def test_usage_errors(app, conn, capsys):
    assert qvm_run.main(["work"], app=app) == 2
    assert capsys.readouterr().err == "qvm-run: error: the following arguments are required: COMMAND\n"
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Running")
    assert qvm_run.main(["--localcmd", "cat", "-p", "work", "x"], app=app) == 1
    assert capsys.readouterr().err == "qvm-run: error: --localcmd is not supported yet\n"
    assert qvm_run.main(["nope", "ls"], app=app) == 2
    assert capsys.readouterr().err == "qvm-run: error: no such domain: 'nope'\n"


def test_filter_escape_chars_option(app, conn, capsysbinary, stdin):
    running_vm(conn)
    conn.stream_handlers[run_header("work")] = RunHandler(
        exit_with(0, out="\x1b]0;pwned\x07ok\tfine\r\n\x9bé€\n".encode()))
    stdin(b"")
    assert qvm_run.main(["-p", "--filter-escape-chars", "work", "x"], app=app) == 0
    assert capsysbinary.readouterr().out == "_]0;pwned\x07ok\tfine\r\n_é€\n".encode()


def test_escape_filter_handles_split_utf8():
    got = []
    f = EscapeFilter(got.append)
    data = "é€\x1b".encode()
    for i in range(len(data)):
        f(data[i:i + 1])
    assert b"".join(got) == "é€_".encode()


def test_arguments_go_through_vmexec_when_the_qube_has_it(app, conn, stdin):
    running_vm(conn)
    conn.expected_calls[("work", "admin.vm.feature.Get", "vmexec", b"")] = b"0\x001"
    handler = conn.stream_handlers[run_header("work")] = RunHandler(exit_with(0))
    stdin(b"")
    assert qvm_run.main(["-p", "work", "--", "ls", "-a", "x y/ü"], app=app) == 0
    assert handler.request == (p.SERVICE,
                               b"user\x00qubes.VMExec+ls+--a+x-20y-2F-C3-BC\x00dom0")
