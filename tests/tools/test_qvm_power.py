"""qvm-start, qvm-shutdown, qvm-kill, qvm-pause, qvm-unpause."""

from __future__ import annotations

import socket

from bulkhead.client import power
from bulkhead.tools import qvm_kill, qvm_pause, qvm_shutdown, qvm_start, qvm_unpause
from toolfakes import error, vm_list

LIST = ("dom0", "admin.vm.List", None, b"")
EVENTS_HEADER = b"admin.Events+ dom0 name dom0\x00"


def state(vm: str) -> tuple:
    return (vm, "admin.vm.CurrentState", None, b"")


def running(s: str = "Running") -> bytes:
    return f"0\x00mem=400000 mem_static_max=400000 cputime=1 power_state={s}".encode()


# --- qvm-start ---------------------------------------------------------------------

def test_start(app, conn):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[state("work")] = running("Halted")
    conn.expected_calls[("work", "admin.vm.Start", None, b"")] = b"0\x00"
    assert qvm_start.main(["work"], app=app) == 0
    conn.assert_all_called()


def test_start_already_running(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Running")
    conn.expected_calls[state("work")] = running()
    assert qvm_start.main(["work"], app=app) == 1
    assert capsys.readouterr().err == "qvm-start: error: domain work is already running\n"
    assert qvm_start.main(["--skip-if-running", "work"], app=app) == 0
    assert ("work", "admin.vm.Start", None, b"") not in conn.calls


def test_start_failure_reports_daemon_message(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    conn.expected_calls[state("work")] = running("Halted")
    conn.expected_calls[("work", "admin.vm.Start", None, b"")] = error(
        "QubesMemoryError", "Not enough memory to start domain 'work'")
    assert qvm_start.main(["work"], app=app) == 1
    assert capsys.readouterr().err == "qvm-start: error: work: Not enough memory to start domain 'work'\n"


def test_start_all_excludes_dom0_and_excluded(app, conn):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running", "a class=AppVM state=Halted",
                                        "b class=AppVM state=Halted", "c class=AppVM state=Halted")
    for vm in "abc":
        conn.expected_calls[state(vm)] = running("Halted")
        conn.expected_calls[(vm, "admin.vm.Start", None, b"")] = b"0\x00"
    assert qvm_start.main(["--all", "--exclude", "b"], app=app) == 0
    starts = [c[0] for c in conn.calls if c[1] == "admin.vm.Start"]
    assert starts == ["a", "c"]


def test_exclude_without_all(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Halted")
    assert qvm_start.main(["--exclude", "x", "work"], app=app) == 2
    assert capsys.readouterr().err == "qvm-start: error: --exclude can only be used with --all\n"


def test_no_qube_given(app, capsys):
    assert qvm_start.main([], app=app) == 2
    assert capsys.readouterr().err == "qvm-start: error: one of the arguments --all VMNAME is required\n"


# --- qvm-shutdown ------------------------------------------------------------------

def test_shutdown(app, conn):
    conn.expected_calls[LIST] = vm_list("some-vm class=AppVM state=Running", "other-vm class=AppVM state=Running")
    conn.expected_calls[("some-vm", "admin.vm.Shutdown", None, b"")] = b"0\x00"
    conn.expected_calls[("other-vm", "admin.vm.Shutdown", None, b"")] = b"0\x00"
    assert qvm_shutdown.main(["some-vm", "other-vm"], app=app) == 0
    conn.assert_all_called()


def test_shutdown_not_running_is_fine(app, conn):
    conn.expected_calls[LIST] = vm_list("some-vm class=AppVM state=Halted")
    conn.expected_calls[("some-vm", "admin.vm.Shutdown", None, b"")] = error(
        "QubesVMNotStartedError", "Domain is powered off: 'some-vm'")
    assert qvm_shutdown.main(["some-vm"], app=app) == 0


def test_shutdown_refused(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("sys-net class=AppVM state=Running")
    conn.expected_calls[("sys-net", "admin.vm.Shutdown", None, b"")] = error(
        "QubesVMInUseError", "Domain is in use: 'sys-net'")
    assert qvm_shutdown.main(["sys-net"], app=app) == 1
    assert capsys.readouterr().err == "qvm-shutdown: error: sys-net: Domain is in use: 'sys-net'\n"


def test_shutdown_force(app, conn):
    conn.expected_calls[LIST] = vm_list("sys-net class=AppVM state=Running")
    conn.expected_calls[("sys-net", "admin.vm.Shutdown", "force", b"")] = b"0\x00"
    assert qvm_shutdown.main(["--force", "sys-net"], app=app) == 0
    conn.assert_all_called()


def events_server(conn, *events: bytes):
    """An admin.Events stream: the confirmation, then ``events``, kept open until the test ends."""
    def serve(sock: socket.socket) -> None:
        request = b""
        while not request.endswith(b"\x00"):
            chunk = sock.recv(100)
            assert chunk, "client closed before the request ended"
            request += chunk
        assert request == EVENTS_HEADER
        sock.sendall(b"1\x00\x00connection-established\x00\x00")
        for event in events:
            sock.sendall(event)
        # the client has shut down its write side: the stream stays open regardless
        conn.finished.wait(5)
    return serve


def test_shutdown_wait_with_events(app, conn):
    conn.expected_calls[LIST] = vm_list("some-vm class=AppVM state=Running")
    conn.expected_calls[("some-vm", "admin.vm.Shutdown", None, b"")] = b"0\x00"
    conn.expected_calls[state("some-vm")] = [running(), running("Halted")]
    conn.stream_handlers[EVENTS_HEADER] = events_server(conn, b"1\x00some-vm\x00domain-shutdown\x00\x00")
    assert qvm_shutdown.main(["--wait", "some-vm"], app=app) == 0
    conn.assert_all_called()
    assert ("some-vm", "admin.vm.Kill", None, b"") not in conn.calls


def test_shutdown_wait_all_forces_and_kills_after_timeout(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("dom0 class=AdminVM state=Running",
                                        "sys-net class=AppVM state=Running",
                                        "stuck class=AppVM state=Running")
    conn.expected_calls[("sys-net", "admin.vm.Shutdown", "force", b"")] = b"0\x00"
    conn.expected_calls[("stuck", "admin.vm.Shutdown", "force", b"")] = b"0\x00"
    conn.expected_calls[state("sys-net")] = running("Halted")
    conn.expected_calls[state("stuck")] = [running(), running("Halted")]
    conn.expected_calls[("stuck", "admin.vm.Kill", None, b"")] = b"0\x00"
    conn.stream_handlers[EVENTS_HEADER] = events_server(conn)
    assert qvm_shutdown.main(["--wait", "--all", "--timeout", "0.3"], app=app) == 0
    conn.assert_all_called()
    assert "stuck: did not shut down in 0.3 s, killing it" in capsys.readouterr().err


def test_shutdown_wait_without_events_polls_and_reports_failures(app, conn, capsys, monkeypatch):
    monkeypatch.setattr(power, "POLL_INTERVAL", 0.01)
    conn.expected_calls[LIST] = vm_list("stuck class=AppVM state=Running")
    conn.expected_calls[("stuck", "admin.vm.Shutdown", None, b"")] = b"0\x00"
    conn.expected_calls[state("stuck")] = running()
    # the daemon refuses the subscription: the tool polls CurrentState instead
    conn.stream_handlers[EVENTS_HEADER] = lambda sock: sock.sendall(
        b"2\x00QubesException\x00\x00not supported\x00")
    conn.expected_calls[("stuck", "admin.vm.Kill", None, b"")] = b"0\x00"
    assert qvm_shutdown.main(["--wait", "--timeout", "0.05", "stuck"], app=app) == 1
    assert capsys.readouterr().err.endswith("qvm-shutdown: error: Failed to shut down: stuck\n")
    conn.expected_calls[("stuck", "admin.vm.Kill", None, b"")] = error("QubesException", "cannot kill")
    assert qvm_shutdown.main(["--wait", "--timeout", "0.05", "stuck"], app=app) == 1
    assert capsys.readouterr().err.endswith("qvm-shutdown: error: cannot kill\n")


def test_shutdown_wait_retries_qubes_in_use_after_their_users(app, conn):
    conn.expected_calls[LIST] = vm_list("sys-net class=AppVM state=Running",
                                        "sys-firewall class=AppVM state=Running")
    conn.expected_calls[("sys-net", "admin.vm.Shutdown", None, b"")] = [
        error("QubesVMInUseError", "Domain is in use: 'sys-net'"), b"0\x00"]
    conn.expected_calls[("sys-firewall", "admin.vm.Shutdown", None, b"")] = b"0\x00"
    conn.expected_calls[state("sys-firewall")] = running("Halted")
    conn.expected_calls[state("sys-net")] = running("Halted")
    conn.stream_handlers[EVENTS_HEADER] = events_server(conn)
    assert qvm_shutdown.main(["--wait", "sys-net", "sys-firewall"], app=app) == 0
    shutdowns = [c[0] for c in conn.calls if c[1] == "admin.vm.Shutdown"]
    assert shutdowns == ["sys-net", "sys-firewall", "sys-net"]


# --- qvm-kill, qvm-pause, qvm-unpause ------------------------------------------------

def test_kill(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("a class=AppVM state=Running", "b class=AppVM state=Halted",
                                        "c class=AppVM state=Running")
    conn.expected_calls[("a", "admin.vm.Kill", None, b"")] = b"0\x00"
    conn.expected_calls[("b", "admin.vm.Kill", None, b"")] = error(
        "QubesVMNotStartedError", "Domain is powered off: 'b'")
    conn.expected_calls[("c", "admin.vm.Kill", None, b"")] = error("BackendError", "qemu is gone")
    assert qvm_kill.main(["a", "b", "c"], app=app) == 1
    assert capsys.readouterr().err == "qvm-kill: error: Failed to kill 'c': qemu is gone\n"


def test_pause_and_unpause(app, conn, capsys):
    conn.expected_calls[LIST] = vm_list("work class=AppVM state=Running")
    conn.expected_calls[("work", "admin.vm.Pause", None, b"")] = b"0\x00"
    conn.expected_calls[("work", "admin.vm.Unpause", None, b"")] = error(
        "QubesVMNotPausedError", "Domain is not paused: 'work'")
    assert qvm_pause.main(["work"], app=app) == 0
    assert qvm_unpause.main(["work"], app=app) == 1
    assert capsys.readouterr().err == "qvm-unpause: error: work: Domain is not paused: 'work'\n"
