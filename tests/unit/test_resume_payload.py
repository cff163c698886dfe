"""RESUME: what dom0 tells a qube restored from a saved boot state, and its strict reading."""

from __future__ import annotations

import pytest

from bulkhead.guest import protocol as P

SEED = bytes(range(64))


def test_round_trip():
    payload = P.pack_resume(SEED, "work", True, {"vdb": 4194304, "vdc": 8},
                            {"02:b4:00:00:00:01": "00:16:3e:5e:6c:07"})
    assert len(payload) <= P.PAYLOAD_LIMIT[P.RESUME]
    assert P.split_resume(payload) == (SEED, "work", True, {"vdb": 4194304, "vdc": 8},
                                       {"02:b4:00:00:00:01": "00:16:3e:5e:6c:07"})


def test_no_network_no_disks():
    assert P.split_resume(P.pack_resume(SEED, "vault", False, {})) == (SEED, "vault", False, {}, {})


@pytest.mark.parametrize("rest", [
    b"work\0" + b"1\0vdb=1",                 # a field missing
    b"@dom0\0" + b"0\0\0",                   # not a qube name
    b"work\0" + b"2\0\0",                    # a bad flag
    b"work\0" + b"0\0vda=5\0",               # root is not resized
    b"work\0" + b"0\0vdb=x\0",
    b"work\0" + b"0\0\0" + b"02:b4:00:00:00:01=zz",
    b"w\xffrk\0" + b"0\0\0",
])
def test_bad_payloads_are_violations(rest):
    with pytest.raises(P.ProtocolViolation):
        P.split_resume(SEED + rest)


def test_a_guest_may_not_send_resume():
    header = P.pack(P.RESUME, 1, b"")[:P.HEADER_SIZE]
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header, P.FROM_GUEST)
