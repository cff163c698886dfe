"""What dom0's VLAN relay does to a frame: insert one 802.1Q tag, or check the one the kernel took off.

A frame the relay reads or writes is a packet socket's (see :mod:`.link`): a
virtio-net header of fixed size (10 bytes: flags, GSO type, header length, GSO
size, checksum start and offset) and then the Ethernet frame.  The relay never
parses a frame beyond its fixed-offset Ethernet header: two MAC addresses (12
bytes), then the EtherType at offset 12.  The kernel's receive path takes the
outer 802.1Q/802.1ad tag of a frame off and reports it beside the frame
(``PACKET_AUXDATA``), so:

- from a client: a frame that came with a tag (reported, or a 0x9100 one left
  in place) is dropped, as is one shorter than an Ethernet header; the others
  get the client's VLAN tag inserted at offset 12, and the header's two offsets
  into the frame (header length and checksum start) move by the tag's 4 bytes;
- from the netvm: a frame must have come with an 802.1Q tag, of a VLAN that is
  not 0, and carry no second tag; the tag picks the client, the frame goes to
  it as it is (the kernel already removed the tag and fixed the offsets).

The kernel checks a virtio-net header again when the relay sends the frame on.
"""

from __future__ import annotations

import struct

VNET_HDR = 10
ETH_HEADER = 14
TPID_8021Q = b"\x81\x00"
#: EtherTypes that would make a frame a tagged one
TAGGED = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
MAX_FRAME = 65536 + 64
VLAN_HLEN = 4
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
# struct tpacket_auxdata: tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid
AUXDATA = struct.Struct("=IIIHHHH")
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40


def vlan_of(auxdata: bytes | None) -> int | None:
    """The tag the kernel took off a received frame: (TPID 802.1Q) -> its VLAN id;
    0 when it came untagged; None for another TPID (802.1ad) or unreadable data."""
    if auxdata is None or len(auxdata) < AUXDATA.size:
        return None
    status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack_from(auxdata)
    if not status & TP_STATUS_VLAN_VALID:
        return 0
    if status & TP_STATUS_VLAN_TPID_VALID and tpid != 0x8100:
        return None
    vid = tci & 0x0FFF
    return vid if vid else None


def tag(packet: bytes, vid: int, came_tagged: bool = False) -> bytes | None:
    """A client's packet, its frame tagged with VLAN ``vid`` for its netvm; None to drop it."""
    if came_tagged or len(packet) < VNET_HDR + ETH_HEADER or len(packet) > VNET_HDR + MAX_FRAME:
        return None
    frame = VNET_HDR
    if packet[frame + 12:frame + 14] in TAGGED:
        return None
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = \
        struct.unpack_from("<BBHHHH", packet)
    if hdr_len:
        hdr_len += VLAN_HLEN
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        csum_start += VLAN_HLEN
    if hdr_len > 0xFFFF or csum_start > 0xFFFF:
        return None
    return (struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
            + packet[frame:frame + 12] + TPID_8021Q + vid.to_bytes(2, "big")
            + packet[frame + 12:])


def untag(packet: bytes, vid: int | None) -> tuple[int, bytes] | None:
    """A packet from the netvm and the VLAN the kernel took off it (:func:`vlan_of`)
    -> (VLAN id, the packet for that client); None to drop it."""
    if not vid or not 0 < vid < 4095:
        return None
    if len(packet) < VNET_HDR + ETH_HEADER or len(packet) > VNET_HDR + MAX_FRAME:
        return None
    if packet[VNET_HDR + 12:VNET_HDR + 14] in TAGGED:
        return None   # a second tag
    return vid, packet
