"""The Admin API's bytes on the wire, against the real server on a temporary socket."""

from __future__ import annotations

import socket
from typing import Any

from core_helpers import call, error, raw_call

LIST = (b"0\0"
        b"debian-12 class=TemplateVM state=Halted\n"
        b"default-dvm class=AppVM state=Halted\n"
        b"dom0 class=AdminVM state=Running\n"
        b"sys-firewall class=AppVM state=Halted\n"
        b"sys-net class=AppVM state=Halted\n"
        b"vault class=AppVM state=Halted\n"
        b"work class=AppVM state=Halted\n")


def test_vm_list(server: Any) -> None:
    assert server.call("dom0", "admin.vm.List") == LIST
    assert server.call("work", "admin.vm.List") == b"0\0work class=AppVM state=Halted\n"
    # the header without '+' and the 'keyword adminvm' destination are Qubes' too
    assert raw_call(server.socket, b"admin.vm.List dom0 name dom0\0") == LIST
    assert raw_call(server.socket, b"admin.vm.List+ dom0 keyword adminvm\0") == LIST
    assert server.call("work", "admin.vm.Start") == b"0\0"
    assert b"work class=AppVM state=Running\n" in server.call("dom0", "admin.vm.List")
    assert b"sys-net class=AppVM state=Running\n" in server.call("dom0", "admin.vm.List")


def test_property_get(server: Any) -> None:
    get = lambda vm, prop: server.call(vm, "admin.vm.property.Get", prop)  # noqa: E731
    assert get("work", "netvm") == b"0\0default=True type=vm sys-firewall"
    assert get("vault", "netvm") == b"0\0default=False type=vm "
    assert get("work", "template") == b"0\0default=False type=vm debian-12"
    assert get("work", "memory") == b"0\0default=True type=int 400"
    assert get("work", "label") == b"0\0default=False type=label blue"
    assert get("work", "provides_network") == b"0\0default=True type=bool False"
    assert get("work", "default_user") == b"0\0default=True type=str user"
    assert get("work", "default_dispvm") == b"0\0default=True type=vm default-dvm"
    assert get("dom0", "label") == b"0\0default=False type=label black"
    assert server.call("dom0", "admin.property.Get", "default_netvm") == \
        b"0\0default=False type=vm sys-firewall"
    assert server.call("dom0", "admin.property.Get", "clockvm") == b"0\0default=True type=vm "
    assert server.call("dom0", "admin.property.Get", "default_qrexec_timeout") == \
        b"0\0default=True type=int 60"
    assert server.call("work", "admin.vm.property.GetDefault", "memory") == b"0\0type=int 400"
    assert server.call("work", "admin.vm.property.GetDefault", "template") == b"0\0"


def test_property_set_then_get(server: Any) -> None:
    assert server.call("work", "admin.vm.property.Set", "netvm", b"sys-net") == b"0\0"
    assert server.call("work", "admin.vm.property.Get", "netvm") == \
        b"0\0default=False type=vm sys-net"
    assert server.call("work", "admin.vm.property.Set", "netvm", b"") == b"0\0"
    assert server.call("work", "admin.vm.property.Get", "netvm") == b"0\0default=False type=vm "
    assert server.call("work", "admin.vm.property.Reset", "netvm") == b"0\0"
    assert server.call("work", "admin.vm.property.Get", "netvm") == \
        b"0\0default=True type=vm sys-firewall"


def test_errors(server: Any) -> None:
    assert server.call("nope", "admin.vm.property.Get", "netvm") == \
        b"2\0QubesVMNotFoundError\0\0No such domain: 'nope'\0"
    assert server.call("work", "admin.vm.property.Get", "nonsense") == \
        b"2\0QubesNoSuchPropertyError\0\0Invalid property 'nonsense' of work\0"
    assert server.call("dom0", "admin.no.Such") == \
        b"2\0ProtocolError\0\0no such method: 'admin.no.Such'\0"
    # Qubes' client formats the message with %: a literal % is doubled
    reply = server.call("work", "admin.vm.property.Set", "memory", b"50%")
    assert reply == (b"2\0QubesPropertyValueError\0\0"
                     b"Property 'memory' must be an integer, not '50%%'\0")
    assert error(reply)[1] % () == "Property 'memory' must be an integer, not '50%'"


class EventReader:
    """Reads ``1\\0subject\\0event\\0(key\\0value\\0)*\\0`` frames from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _field(self) -> bytes:
        while b"\0" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "event stream closed"
            self.buf += chunk
        field, self.buf = self.buf.split(b"\0", 1)
        return field

    def frame(self) -> tuple[bytes, bytes, bytes, dict[bytes, bytes], bytes]:
        start = self.buf
        header = self._field()
        assert header == b"1", header
        subject, event = self._field(), self._field()
        kwargs = {}
        while True:
            key = self._field()
            if not key:
                break
            kwargs[key] = self._field()
        return header, subject, event, kwargs, start


def _events_connection(sock_path: Any, dest: str = "dom0") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock_path))
    s.sendall(f"admin.Events+ dom0 name {dest}\0".encode())
    s.shutdown(socket.SHUT_WR)
    return s


def test_events_from_another_client(server: Any) -> None:
    s = _events_connection(server.socket)
    try:
        first = b""
        while len(first) < len(b"1\0\0connection-established\0\0"):
            first += s.recv(len(b"1\0\0connection-established\0\0") - len(first))
        assert first == b"1\0\0connection-established\0\0"
        reader = EventReader(s)
        assert call(server.socket, "work", "admin.vm.property.Set", "memory", b"512") == b"0\0"
        frames = [reader.frame(), reader.frame()]
        assert [(f[1], f[2], f[3]) for f in frames] == [
            (b"work", b"property-pre-set:memory",
             {b"name": b"memory", b"newvalue": b"512", b"oldvalue": b"400"}),
            (b"work", b"property-set:memory",
             {b"name": b"memory", b"newvalue": b"512", b"oldvalue": b"400"})]
        # exact bytes of one event
        assert call(server.socket, "work", "admin.vm.tag.Set", "mytag") == b"0\0"
        s.settimeout(10)
        raw = b""
        while not raw.endswith(b"mytag\0\0"):
            raw += s.recv(4096)
        assert raw == b"1\0work\0domain-tag-add:mytag\0tag\0mytag\0\0"
        # app events have an empty subject
        assert call(server.socket, "dom0", "admin.property.Set", "default_qrexec_timeout",
                    b"90") == b"0\0"
        pre, post = reader.frame(), reader.frame()
        assert (post[1], post[2]) == (b"", b"property-set:default_qrexec_timeout")
        assert post[3] == {b"name": b"default_qrexec_timeout", b"newvalue": b"90",
                           b"oldvalue": b"60"}
        assert (pre[1], pre[2]) == (b"", b"property-pre-set:default_qrexec_timeout")
        # power events; a new qube's events
        assert call(server.socket, "vault", "admin.vm.Start") == b"0\0"
        assert [reader.frame()[2] for _ in range(2)] == [b"domain-pre-start", b"domain-start"]
        assert call(server.socket, "dom0", "admin.vm.Create.AppVM", None,
                    b"name=new label=red") == b"0\0"
        frame = reader.frame()
        assert (frame[1], frame[2], frame[3]) == (b"", b"domain-add", {b"vm": b"new"})
        assert call(server.socket, "new", "admin.vm.feature.Set", "f", b"v") == b"0\0"
        assert reader.frame()[2] == b"domain-feature-pre-set:f"
        assert reader.frame()[1:4] == (b"new", b"domain-feature-set:f",
                                       {b"feature": b"f", b"value": b"v"})
    finally:
        s.close()


def test_events_of_one_qube(server: Any) -> None:
    s = _events_connection(server.socket, "vault")
    try:
        reader = EventReader(s)
        assert reader.frame()[2] == b"connection-established"
        assert call(server.socket, "work", "admin.vm.tag.Set", "other") == b"0\0"
        assert call(server.socket, "vault", "admin.vm.tag.Set", "mine") == b"0\0"
        frame = reader.frame()
        assert (frame[1], frame[2]) == (b"vault", b"domain-tag-add:mine")
    finally:
        s.close()


def test_closed_event_streams_are_dropped(server: Any) -> None:
    for _ in range(5):
        s = _events_connection(server.socket)
        EventReader(s).frame()
        s.close()
    # each stream notices its client left at the next event it has to send
    assert call(server.socket, "work", "admin.vm.tag.Set", "ping") == b"0\0"
    import time
    deadline = time.monotonic() + 10
    while server.app._observers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app._observers == []
