"""The guest-agent wire format (bulkhead.guest.protocol): framing and payload checks.

Both dom0 and the guest parse what the other side sends with this module, so
every rule here is a line of defence: a header that is wrong must be refused
from its 12 bytes alone, before any payload is buffered.
"""

from __future__ import annotations

import struct

import pytest

from bulkhead.guest import protocol as P


def header(mtype: int, chan: int, length: int, flags: int = 0) -> bytes:
    """A raw header, built independently of P.pack so the two can be checked against each other."""
    return struct.pack("<HHII", mtype, flags, chan, length)


# --- pack -----------------------------------------------------------------------

def test_pack_layout_is_little_endian_type_flags_channel_length():
    frame = P.pack(P.STDOUT, 7, b"hello")
    assert len(frame) == P.HEADER_SIZE + 5
    assert frame[:P.HEADER_SIZE] == header(P.STDOUT, 7, 5)
    assert frame[P.HEADER_SIZE:] == b"hello"


def test_pack_empty_payload_is_a_bare_header():
    assert P.pack(P.SHUTDOWN, 0) == header(P.SHUTDOWN, 0, 0)


def test_pack_accepts_max_payload_and_refuses_one_more_byte():
    assert len(P.pack(P.STDIN, 1, b"x" * P.MAX_PAYLOAD)) == P.HEADER_SIZE + P.MAX_PAYLOAD
    with pytest.raises(ValueError):
        P.pack(P.STDIN, 1, b"x" * (P.MAX_PAYLOAD + 1))


def test_integer_helpers_round_trip_and_refuse_wrong_sizes():
    assert P.parse_u32(P.u32(0xDEADBEEF)) == 0xDEADBEEF
    assert P.parse_i32(P.i32(-5)) == -5
    for bad in (b"", b"\0\0\0", b"\0" * 5):
        with pytest.raises(P.ProtocolViolation):
            P.parse_u32(bad)
        with pytest.raises(P.ProtocolViolation):
            P.parse_i32(bad)


# --- parse_header ----------------------------------------------------------------

def test_parse_header_returns_type_channel_length():
    assert P.parse_header(header(P.STDOUT, 3, 100), P.FROM_GUEST) == (P.STDOUT, 3, 100)
    assert P.parse_header(header(P.HELLO, 0, 4), P.FROM_GUEST) == (P.HELLO, 0, 4)


@pytest.mark.parametrize("mtype", sorted(P.FROM_DOM0 - P.FROM_GUEST))
def test_dom0_only_types_are_refused_from_the_guest(mtype):
    # EXEC, STDIN, SIGNAL, SHUTDOWN, PING, SERVICE: a guest must never send these to dom0.
    chan = 0 if mtype in P.CONTROL_ONLY else 1
    with pytest.raises(P.ProtocolViolation, match="unexpected message type"):
        P.parse_header(header(mtype, chan, 0), P.FROM_GUEST)


@pytest.mark.parametrize("mtype", sorted(P.FROM_GUEST - P.FROM_DOM0))
def test_guest_only_types_are_refused_from_dom0(mtype):
    chan = 0 if mtype in P.CONTROL_ONLY else 1
    with pytest.raises(P.ProtocolViolation, match="unexpected message type"):
        P.parse_header(header(mtype, chan, 0), P.FROM_DOM0)


@pytest.mark.parametrize("mtype", [0, 14, 0xFFFF])
def test_unknown_types_are_refused(mtype):
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header(mtype, 1, 0), P.FROM_GUEST)


@pytest.mark.parametrize("flags", [1, 0x8000, 0xFFFF])
def test_nonzero_flags_are_refused(flags):
    with pytest.raises(P.ProtocolViolation, match="flags"):
        P.parse_header(header(P.STDOUT, 1, 0, flags=flags), P.FROM_GUEST)


@pytest.mark.parametrize("mtype", sorted(P.FROM_GUEST))
def test_each_guest_type_is_held_to_its_own_limit(mtype):
    chan = 0 if mtype in P.CONTROL_ONLY else 1
    if mtype in (P.CALL, P.STDIN, P.DATA):    # only on a channel the guest opened
        chan |= P.GUEST_CHANNEL
    limit = P.PAYLOAD_LIMIT[mtype]
    assert P.parse_header(header(mtype, chan, limit), P.FROM_GUEST)[2] == limit
    with pytest.raises(P.ProtocolViolation, match="exceeds its limit"):
        P.parse_header(header(mtype, chan, limit + 1), P.FROM_GUEST)


def test_per_type_limits_are_tighter_than_the_global_limit():
    # e.g. an EXIT carries exactly an i32; a 64 KiB "EXIT" is an attack, not a message.
    assert P.PAYLOAD_LIMIT[P.EXIT] == 4
    assert P.PAYLOAD_LIMIT[P.PONG] == 64
    assert all(limit <= P.MAX_PAYLOAD for limit in P.PAYLOAD_LIMIT.values())
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header(P.EXIT, 1, 5), P.FROM_GUEST)


def test_huge_length_is_refused():
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header(P.STDOUT, 1, 0xFFFFFFFF), P.FROM_GUEST)


@pytest.mark.parametrize("mtype", sorted(P.CONTROL_ONLY & P.FROM_GUEST))
def test_control_types_only_on_channel_zero(mtype):
    P.parse_header(header(mtype, 0, 0), P.FROM_GUEST)
    for chan in (1, 2**31):
        with pytest.raises(P.ProtocolViolation, match="on channel"):
            P.parse_header(header(mtype, chan, 0), P.FROM_GUEST)


@pytest.mark.parametrize("mtype", sorted(P.FROM_GUEST - P.CONTROL_ONLY))
def test_call_types_never_on_channel_zero(mtype):
    with pytest.raises(P.ProtocolViolation, match="on channel 0"):
        P.parse_header(header(mtype, 0, 0), P.FROM_GUEST)


def test_dom0_control_types_on_channel_zero_only():
    P.parse_header(header(P.SHUTDOWN, 0, 0), P.FROM_DOM0)
    P.parse_header(header(P.PING, 0, 8), P.FROM_DOM0)
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header(P.SHUTDOWN, 5, 0), P.FROM_DOM0)
    with pytest.raises(P.ProtocolViolation):
        P.parse_header(header(P.EXEC, 0, 10), P.FROM_DOM0)


# --- FrameReader -------------------------------------------------------------------

def sample_stream() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    frames = [
        (P.HELLO, 0, P.u32(P.VERSION)),
        (P.STDOUT, 1, b"abc"),
        (P.STDERR, 1, b""),             # zero-length payloads are frames too
        (P.STDOUT, 2, bytes(range(256)) * 4),
        (P.EXIT, 1, P.i32(0)),
        (P.PONG, 0, b"12345678"),
    ]
    return b"".join(P.pack(*f) for f in frames), frames


def test_reader_several_frames_in_one_chunk():
    data, frames = sample_stream()
    reader = P.FrameReader(P.FROM_GUEST)
    assert reader.feed(data) == frames
    assert not reader.mid_frame


def test_reader_split_at_every_byte_boundary():
    # A stream socket may cut the bytes anywhere; every cut must give the same frames.
    data, frames = sample_stream()
    for cut in range(1, len(data)):
        reader = P.FrameReader(P.FROM_GUEST)
        got = reader.feed(data[:cut])
        got += reader.feed(data[cut:])
        assert got == frames, f"cut at {cut}"
        assert not reader.mid_frame


def test_reader_one_byte_at_a_time_tracks_mid_frame():
    frame = P.pack(P.STDOUT, 1, b"xyz")
    reader = P.FrameReader(P.FROM_GUEST)
    for i, b in enumerate(frame[:-1]):
        assert reader.feed(bytes([b])) == []
        assert reader.mid_frame, f"after {i + 1} bytes a frame has begun"
    assert reader.feed(frame[-1:]) == [(P.STDOUT, 1, b"xyz")]
    assert not reader.mid_frame


def test_reader_mid_frame_after_header_of_empty_payload_is_false():
    reader = P.FrameReader(P.FROM_GUEST)
    assert not reader.mid_frame
    assert reader.feed(P.pack(P.STDOUT, 1, b"")) == [(P.STDOUT, 1, b"")]
    assert not reader.mid_frame


def test_reader_mid_frame_while_payload_outstanding():
    reader = P.FrameReader(P.FROM_GUEST)
    assert reader.feed(header(P.STDOUT, 1, 10) + b"12345") == []
    assert reader.mid_frame
    assert reader.feed(b"67890") == [(P.STDOUT, 1, b"1234567890")]
    assert not reader.mid_frame


def test_reader_rejects_oversized_header_before_the_payload_arrives():
    # Only the 12 header bytes have arrived: the violation must be raised now, not
    # after the reader has waited for (and buffered) 4 GiB.
    reader = P.FrameReader(P.FROM_GUEST)
    with pytest.raises(P.ProtocolViolation):
        reader.feed(header(P.STDOUT, 1, 0xFFFFFFFF))


def test_reader_rejects_oversized_header_split_across_feeds():
    reader = P.FrameReader(P.FROM_GUEST)
    raw = header(P.STDOUT, 1, P.MAX_PAYLOAD + 1)
    assert reader.feed(raw[:11]) == []
    with pytest.raises(P.ProtocolViolation):
        reader.feed(raw[11:])


def test_reader_returns_good_frames_then_raises_on_a_bad_one_in_a_later_feed():
    reader = P.FrameReader(P.FROM_GUEST)
    assert reader.feed(P.pack(P.STDOUT, 1, b"ok")) == [(P.STDOUT, 1, b"ok")]
    with pytest.raises(P.ProtocolViolation):
        reader.feed(header(P.EXEC, 1, 0))   # EXEC is dom0 -> guest only


def test_reader_dom0_direction():
    reader = P.FrameReader(P.FROM_DOM0)
    frames = [(P.EXEC, 1, b"user\0true"), (P.STDIN, 1, b""), (P.SIGNAL, 1, P.u32(15))]
    assert reader.feed(b"".join(P.pack(*f) for f in frames)) == frames
    with pytest.raises(P.ProtocolViolation):
        P.FrameReader(P.FROM_DOM0).feed(P.pack(P.STDOUT, 1, b"x"))


# --- split_exec --------------------------------------------------------------------

def test_split_exec_good():
    assert P.split_exec(b"user\0echo hi") == ("user", "echo hi")
    # Only the first NUL separates: the command is opaque text after it.
    assert P.split_exec(b"root\0printf 'a\\0b'") == ("root", "printf 'a\\0b'")
    assert P.split_exec("user\0échó".encode()) == ("user", "échó")


@pytest.mark.parametrize("payload", [
    b"",                        # nothing
    b"user",                    # no separator
    b"\0command",               # no user
    b"user\0",                  # no command
    b"u" * (P.MAX_USER + 1) + b"\0ls",   # user too long
    "usér\0ls".encode(),        # user not ASCII
    b"user\0\xff\xfe",          # command not UTF-8
])
def test_split_exec_bad(payload):
    with pytest.raises(P.ProtocolViolation):
        P.split_exec(payload)


def test_split_exec_user_at_max_length():
    user = "u" * P.MAX_USER
    assert P.split_exec(user.encode() + b"\0ls") == (user, "ls")


# --- service names -------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "qubes.Filecopy", "qubes.OpenInVM", "qubes.Gpg+sign", "my-svc_1.x", "a", "x" * 256,
    "qubes.VMExec+echo+hello-20world",   # more "+" in the argument: qubes.VMExec's words
])
def test_valid_service_names(name):
    assert P.valid_service_name(name)


@pytest.mark.parametrize("name", [
    "", ".hidden", "+arg", "-opt", "a/b", "../etc", "a..b", "a b", "a\0b",
    "qubes.Fïle", "a;b", "a\nb", "x" * 257,
])
def test_invalid_service_names(name):
    assert not P.valid_service_name(name)


def test_split_service_good():
    assert P.split_service(b"user\0qubes.Filecopy\0work") == ("user", "qubes.Filecopy", "work")
    assert P.split_service(b"root\0qubes.Gpg+sign\0dom0") == ("root", "qubes.Gpg+sign", "dom0")


@pytest.mark.parametrize("payload", [
    b"user\0qubes.Filecopy",                 # two parts
    b"user\0qubes.Filecopy\0work\0extra",    # four parts
    b"\0qubes.Filecopy\0work",               # empty user
    b"u" * (P.MAX_USER + 1) + b"\0qubes.X\0work",
    b"user\0../../bin/sh\0work",             # a path, not a service name
    b"user\0\0work",                         # empty service
    b"user\0qubes.X\0w\xc3\xa9",             # source not ASCII
])
def test_split_service_bad(payload):
    with pytest.raises(P.ProtocolViolation):
        P.split_service(payload)


@pytest.mark.parametrize("mtype,chan,allowed", [
    (P.CALL, 1, P.FROM_GUEST),                     # the guest opens calls on its own channels
    (P.STDIN, 1, P.FROM_GUEST),                    # a guest's input goes on its own channels
    (P.DATA, 1, P.FROM_GUEST),                     # ...by DATA too, never on dom0's
    (P.STDOUT, P.GUEST_CHANNEL | 1, P.FROM_GUEST),  # ...and output on dom0's
    (P.EXIT, P.GUEST_CHANNEL | 1, P.FROM_GUEST),
    (P.EXEC, P.GUEST_CHANNEL | 1, P.FROM_DOM0),
    (P.STDOUT, 1, P.FROM_DOM0),
    (P.EXIT, 1, P.FROM_DOM0),
])
def test_each_side_keeps_to_its_role_on_each_kind_of_channel(mtype, chan, allowed):
    with pytest.raises(P.ProtocolViolation, match="channel"):
        P.parse_header(header(mtype, chan, 0), allowed)


def test_call_payloads():
    assert P.split_call(b"work\0qubes.Filecopy") == ("work", "qubes.Filecopy")
    assert P.split_call(b"@dispvm:default-dvm\0qubes.OpenInVM+x") == (
        "@dispvm:default-dvm", "qubes.OpenInVM+x")
    for bad in (b"work", b"\0qubes.Filecopy", b"../x\0s", b"@anyvm\0s", b"w\0../etc",
                b"w\xff\0s", b"a" * 40 + b"\0s", b"work\0"):
        with pytest.raises(P.ProtocolViolation):
            P.split_call(bad)
