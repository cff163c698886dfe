"""Malformed Admin API requests, and sending bytes exactly as given, for the tests
that check the daemon's wire format and that it survives bad input."""

from __future__ import annotations

import random
import socket
from pathlib import Path

KNOWN_ERRORS = {"ProtocolError", "PermissionDenied", "QubesValueError", "QubesVMNotFoundError",
                "QubesPropertyValueError", "QubesNoSuchPropertyError", "QubesLabelNotFoundError",
                "QubesFeatureNotFoundError", "QubesTagNotFoundError", "QubesVolumeNotFoundError",
                "QubesPoolNotFoundError"}

METHODS = ["admin.vm.List", "admin.vm.property.Get", "admin.vm.property.Set",
           "admin.vm.feature.Set", "admin.vm.tag.Set", "admin.vm.Create.AppVM",
           "admin.vm.volume.Resize", "admin.label.Get", "admin.property.Set"]


def malformed(rng: random.Random, i: int) -> bytes:
    kind = i % 10
    if kind == 0:  # no NUL at all
        return bytes(rng.choice(b"abcdefgh .+") for _ in range(rng.randint(0, 200)))
    if kind == 1:  # binary garbage, NULs anywhere
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if kind == 2:  # a huge payload on a real method
        return b"admin.vm.feature.Set+f dom0 name work\0" + b"x" * rng.randint(65537, 90000)
    if kind == 3:  # unknown methods
        name = "".join(rng.choice("abcXYZ.") for _ in range(rng.randint(1, 40)))
        return f"admin.{name}+ dom0 name dom0\0".encode()
    if kind == 4:  # invalid qube names
        bad = rng.choice(["1abc", "a" * 40, "x/y", "-", "none", "default", "a..b$", "é"])
        return f"admin.vm.List+ dom0 name {bad}\0".encode("utf-8")
    if kind == 5:  # wrong-typed values
        prop, value = rng.choice([("memory", b"lots"), ("vcpus", b"-1"), ("autostart", b"2"),
                                  ("netvm", b"no-such-qube"), ("label", b"pink"),
                                  ("maxmem", b"1e9"), ("qrexec_timeout", b"\xff"),
                                  ("template", b"sys-net"), ("kernelopts", b"\x00\x01")])
        return f"admin.vm.property.Set+{prop} dom0 name work\0".encode() + value
    if kind == 6:  # a header longer than allowed
        return b"admin.vm.List+" + b"a" * rng.randint(300, 3000) + b" dom0 name dom0\0"
    if kind == 7:  # the wrong shape: missing or extra fields, wrong destination type
        return rng.choice([b"admin.vm.List\0", b"admin.vm.List+ dom0\0",
                           b"admin.vm.List+ dom0 name dom0 extra\0",
                           b"admin.vm.List+ dom0 uuid dom0\0", b"\0", b" \0",
                           b"admin.vm.List+ dom0 name uuid:zzzz\0",
                           b"admin.vm.List+ dom0 name uuid:0000\0"])
    if kind == 8:  # bad arguments and payloads to real methods
        method = rng.choice(METHODS)
        arg = rng.choice(["", "memory", "../x", "a b", "%s%n", "x" * 200])
        header = f"{method}+{arg} dom0 name work\0".encode("utf-8", "replace")
        return header + bytes(rng.randrange(256) for _ in range(rng.randint(0, 50)))
    return b""  # connect and say nothing


def raw_call(sock_path: str | Path, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` as is, shut down the write side, read the whole reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse a request before reading all of it
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()
