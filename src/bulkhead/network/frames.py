"""What dom0's VLAN relay does to a frame: insert or remove one 802.1Q tag, nothing more.

The relay never parses a frame beyond its fixed-offset Ethernet header: two
MAC addresses (12 bytes), then the EtherType at offset 12.  A client's frame
gets the tag of the client's VLAN inserted there; a frame from the netvm must
carry a tag, which picks the client and is removed.  Anything else is dropped:

- from a client: a frame shorter than an Ethernet header, or already tagged
  (802.1Q, 802.1ad or the old 0x9100), which could otherwise pick a VLAN;
- from the netvm: an untagged frame, a tag of no client, a frame tagged twice.
"""

from __future__ import annotations

ETH_HEADER = 14
TPID_8021Q = b"\x81\x00"
#: EtherTypes that would make a frame a tagged one
TAGGED = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
MAX_FRAME = 65536 + 64


def tag(frame: bytes, vid: int) -> bytes | None:
    """A client's frame, tagged with VLAN ``vid`` for its netvm; None to drop it."""
    if len(frame) < ETH_HEADER or len(frame) > MAX_FRAME:
        return None
    if frame[12:14] in TAGGED:
        return None
    return frame[:12] + TPID_8021Q + vid.to_bytes(2, "big") + frame[12:]


def untag(frame: bytes) -> tuple[int, bytes] | None:
    """A frame from the netvm -> (VLAN id, the untagged frame); None to drop it."""
    if len(frame) < ETH_HEADER + 4 or len(frame) > MAX_FRAME + 4:
        return None
    if frame[12:14] != TPID_8021Q or frame[16:18] in TAGGED:
        return None
    vid = int.from_bytes(frame[14:16], "big") & 0x0FFF
    if vid == 0:
        return None
    return vid, frame[:12] + frame[16:]
