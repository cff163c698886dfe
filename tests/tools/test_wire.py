"""The Admin API codec, and the Connection against a tiny in-test unix-socket server."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bulkhead import errors
from bulkhead.client import App, Connection
from bulkhead.client import wire


# --- pure codec ------------------------------------------------------------------

def test_header_always_has_the_plus_like_qubesadmin():
    assert wire.encode_header("admin.vm.List", "dom0") == b"admin.vm.List+ dom0 name dom0\0"
    assert (wire.encode_header("admin.vm.property.Get", "work", "netvm")
            == b"admin.vm.property.Get+netvm dom0 name work\0")
    # an argument may itself contain '+' (qubesd splits on the first one)
    assert (wire.encode_header("admin.vm.Shutdown", "work", "force+wait")
            == b"admin.vm.Shutdown+force+wait dom0 name work\0")
    assert wire.encode_header("bulkhead.vm.Run", "work", plus=False) == b"bulkhead.vm.Run dom0 name work\0"


@pytest.mark.parametrize("dest", ["", "a b", "a\0b", "wörk"])
def test_header_refuses_tokens_that_would_shift_fields(dest):
    with pytest.raises(errors.QubesValueError):
        wire.encode_header("admin.vm.Start", dest)


def test_request_is_header_then_payload():
    assert (wire.encode_request("admin.vm.property.Set", "work", "vcpus", b"2")
            == b"admin.vm.property.Set+vcpus dom0 name work\x002")


def test_parse_ok_reply():
    assert wire.parse_reply(b"0\x00body\nmore") == b"body\nmore"
    assert wire.parse_reply(b"0\x00") == b""


def test_parse_error_reply_raises_the_named_class_with_formatted_message():
    with pytest.raises(errors.QubesVMNotFoundError) as info:
        wire.parse_reply(b"2\x00QubesVMNotFoundError\x00\x00No such domain: %r\x00xyz\x00")
    assert str(info.value) == "No such domain: 'xyz'"
    # KeyError-derived: must not be quoted like a KeyError
    assert isinstance(info.value, KeyError)


def test_parse_error_reply_without_args_and_with_traceback():
    with pytest.raises(errors.QubesVMNotHaltedError) as info:
        wire.parse_reply(b"2\x00QubesVMNotHaltedError\x00Traceback...\x00Domain is not powered off: 'work'\x00")
    assert str(info.value) == "Domain is not powered off: 'work'"


def test_exception_classes_with_builtin_bases():
    with pytest.raises(errors.QubesMemoryError) as info:
        wire.parse_reply(b"2\x00QubesMemoryError\x00\x00Not enough memory to start domain 'work'\x00")
    assert isinstance(info.value, MemoryError)
    assert str(info.value) == "Not enough memory to start domain 'work'"
    assert type(info.value).__name__ == "QubesMemoryError"


def test_every_error_class_can_be_decoded():
    for name in dir(errors):
        cls = errors.by_name(name)
        if cls is None or not issubclass(cls, Exception):
            continue
        with pytest.raises(cls) as info:
            wire.parse_reply(b"2\x00" + name.encode() + b"\x00\x00some message\x00")
        assert str(info.value) == "some message"


def test_unknown_exception_type_becomes_qubes_exception():
    with pytest.raises(errors.QubesException) as info:
        wire.parse_reply(b"2\x00SomethingNew\x00\x00it broke\x00")
    assert type(info.value) is errors.QubesException
    assert str(info.value) == "it broke"


def test_digit_arguments_format_as_numbers():
    with pytest.raises(errors.QubesException, match="^3 qubes$"):
        wire.parse_reply(b"2\x00QubesException\x00\x00%d qubes\x003\x00")


def test_message_is_always_a_format_string():
    with pytest.raises(errors.QubesException, match="^pool is 100% full$"):
        wire.parse_reply(b"2\x00QubesException\x00\x00pool is 100%% full\x00")
    # a daemon that forgot to double its % still gets its message through
    with pytest.raises(errors.QubesException, match="^50% done$"):
        wire.parse_reply(b"2\x00QubesException\x00\x0050% done\x00")


def test_mismatched_format_args_are_still_shown():
    with pytest.raises(errors.QubesException, match="no placeholders extra"):
        wire.parse_reply(b"2\x00QubesException\x00\x00no placeholders\x00extra\x00")


@pytest.mark.parametrize("reply", [b"", b"x", b"7\x00abc", b"2\x00OnlyType"])
def test_invalid_replies(reply):
    with pytest.raises(errors.QubesDaemonCommunicationError):
        wire.parse_reply(reply)


def test_event_parser_handles_arbitrary_chunking():
    stream = (b"1\x00\x00connection-established\x00\x00"
              b"1\x00work\x00domain-shutdown\x00\x00"
              b"1\x00work\x00property-set:netvm\x00name\x00netvm\x00newvalue\x00sys-net\x00\x00")
    for size in (1, 2, 3, 7, len(stream)):
        parser = wire.EventParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i:i + size])
        parser.close()
        assert [(e.subject, e.name, e.kwargs) for e in events] == [
            (None, "connection-established", {}),
            ("work", "domain-shutdown", {}),
            ("work", "property-set:netvm", {"name": "netvm", "newvalue": "sys-net"}),
        ]


def test_event_parser_empty_value_is_not_the_end():
    parser = wire.EventParser()
    events = parser.feed(b"1\x00work\x00ev\x00key\x00\x00other\x00v\x00\x00")
    assert events[0].kwargs == {"key": "", "other": "v"}


def test_event_stream_error_reply_is_raised_at_the_end():
    parser = wire.EventParser()
    assert parser.feed(b"2\x00PermissionDenied\x00\x00not allowed\x00") == []
    with pytest.raises(errors.PermissionDenied):
        parser.close()


# --- against a real unix socket ------------------------------------------------------

class TinyServer:
    """Accepts connections; records each request up to EOF; answers with canned bytes."""

    def __init__(self, path: Path, answer: Callable[[bytes], bytes]) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while True:  # the client shuts down its write side: read to EOF
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.answer(data))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bh-") as d:
        yield Path(d)


def test_call_sends_exact_bytes_and_decodes_ok(sockdir):
    server = TinyServer(sockdir / "s", lambda req: b"0\x00default=False type=vm sys-net")
    try:
        conn = Connection(sockdir / "s")
        body = conn.call("work", "admin.vm.property.Get", "netvm")
        assert body == b"default=False type=vm sys-net"
        assert server.requests == [b"admin.vm.property.Get+netvm dom0 name work\x00"]
        conn.call("work", "admin.vm.property.Set", "vcpus", b"4")
        assert server.requests[1] == b"admin.vm.property.Set+vcpus dom0 name work\x004"
    finally:
        server.close()


def test_call_decodes_error_reply(sockdir):
    server = TinyServer(sockdir / "s",
                        lambda req: b"2\x00QubesNoSuchPropertyError\x00\x00Invalid property 'x' of work\x00")
    try:
        with pytest.raises(errors.QubesNoSuchPropertyError, match="Invalid property 'x' of work"):
            Connection(sockdir / "s").call("work", "admin.vm.property.Get", "x")
    finally:
        server.close()


def test_app_reads_typed_property_through_socket(sockdir):
    replies = {
        b"admin.vm.List+ dom0 name dom0\x00": b"0\x00work class=AppVM state=Running\nsys-net class=AppVM state=Running\n",
        b"admin.vm.property.Get+netvm dom0 name work\x00": b"0\x00default=False type=vm sys-net",
    }
    server = TinyServer(sockdir / "s", lambda req: replies[req])
    try:
        app = App(Connection(sockdir / "s"))
        netvm = app.domains["work"].netvm
        assert netvm.name == "sys-net" and netvm.klass == "AppVM"
    finally:
        server.close()


def test_not_running_daemon_gives_a_clear_error(sockdir):
    path = sockdir / "nobody-here.sock"
    with pytest.raises(errors.QubesDaemonCommunicationError) as info:
        Connection(path).call("dom0", "admin.vm.List")
    assert str(info.value) == (f"cannot connect to the Bulkhead daemon at {path}: "
                               "is `bulkhead daemon` running?")


def test_default_socket_comes_from_the_environment(monkeypatch, sockdir):
    monkeypatch.setenv("BULKHEAD_SOCKET", str(sockdir / "env.sock"))
    assert Connection().socket_path == str(sockdir / "env.sock")
    monkeypatch.delenv("BULKHEAD_SOCKET")
    assert Connection().socket_path == "/run/qubesd.sock"
    monkeypatch.setenv("BULKHEAD_SOCKET", "relative.sock")
    assert Connection().socket_path == os.path.join(os.getcwd(), "relative.sock")
    assert Connection(sockdir / "given.sock").socket_path == str(sockdir / "given.sock")


def test_event_stream_over_socket(sockdir):
    path = sockdir / "ev"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    seen = []

    def serve():
        conn, _ = listener.accept()
        with conn:
            data = b""
            while not data.endswith(b"\x00") or b" name " not in data:
                data += conn.recv(100)
            seen.append(data)
            conn.sendall(b"1\x00\x00connection-established\x00\x00")
            conn.sendall(b"1\x00work\x00domain-shutdown\x00\x00")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with Connection(path).events() as stream:
            first = stream.next(5)
            second = stream.next(5)
            assert first.name == "connection-established" and first.subject is None
            assert (second.subject, second.name) == ("work", "domain-shutdown")
            with pytest.raises(errors.QubesDaemonCommunicationError):
                stream.next(5)  # the server closed the stream
        assert seen == [b"admin.Events+ dom0 name dom0\x00"]
    finally:
        thread.join(5)
        listener.close()
        if path.exists():
            os.unlink(path)
