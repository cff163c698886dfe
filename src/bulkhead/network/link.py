"""A link between a qube and dom0's VLAN relay: a tap for QEMU, a packet socket for the relay.

Why a tap and not a datagram socket pair: QEMU gives a guest virtio-net's
offloads (checksum, TSO/GSO: 64 KiB segments, no checksum computed in the
guest) only when its backend carries a virtio-net header, which a tap does and
QEMU's ``dgram``/``stream`` netdevs do not.  Under TCG the checksums and the
segmentation are what forwarding through two netvms cost (FACTS.md).

Each qube start makes its links inside a network namespace of their own, made
by this helper (its own process: the daemon never leaves dom0's namespace):
no address, no route, no bridge, IPv6 off; nothing there but the taps.  For
each link the helper returns two descriptors: the tap (QEMU's backend, with a
virtio-net header) and an ``AF_PACKET`` socket bound to that tap with
``PACKET_VNET_HDR`` (the relay's end: it reads what the qube sends, with its
virtio-net header, and writes what the qube must receive).  The namespace
lives as long as a packet socket of it does (a socket holds its namespace), so
a link survives its netvm's relay and moves between relays as one descriptor.
Frames the tap receives from QEMU also reach that namespace's stack, which has
no address and drops them.

Run as ``python -m bulkhead.network.link COUNT SOCKFD`` (as root): sends
``ok`` and 2*COUNT descriptors (tap, packet socket, tap, ...) on SOCKFD.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import socket
import struct
import sys

from .fdhelper import run_for_fds
from .uplink import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
#: a tap's largest MTU (65535 less the Ethernet header): a 65520-byte link's frames fit
TAP_MTU = 65521
SOCKET_BUFFER = 4 * 1024 * 1024
MAX_LINKS = 2


class LinkError(Exception):
    pass


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _ifreq_ioctl(ctl: socket.socket, request: int, name: str, fmt: str, *values: int) -> bytes:
    ifr = struct.pack("16s" + fmt, name.encode(), *values).ljust(40, b"\0")
    return fcntl.ioctl(ctl.fileno(), request, ifr)


def make_link(ctl: socket.socket, name: str) -> tuple[int, socket.socket]:
    """In the link namespace: tap ``name`` (up, MTU 65521) and a packet socket bound to it."""
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(),
                                            IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    _ifreq_ioctl(ctl, SIOCSIFMTU, name, "i", TAP_MTU)
    pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    for opt in (PACKET_VNET_HDR, PACKET_AUXDATA, PACKET_IGNORE_OUTGOING, PACKET_QDISC_BYPASS):
        pkt.setsockopt(SOL_PACKET, opt, 1)
    for opt in (33, 32):   # SO_RCVBUFFORCE, SO_SNDBUFFORCE: root may exceed rmem_max
        pkt.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    flags = struct.unpack_from("H", _ifreq_ioctl(ctl, SIOCGIFFLAGS, name, "H", 0), 16)[0]
    _ifreq_ioctl(ctl, SIOCSIFFLAGS, name, "H", flags | IFF_UP)
    pkt.bind((name, ETH_P_ALL))   # once up: bound to a down device, it would say ENETDOWN
    return tun, pkt


def helper_main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv) or not 0 < int(argv[0]) <= MAX_LINKS:
        sys.stderr.write("usage: python -m bulkhead.network.link COUNT SOCKFD\n")
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    fds: list[int] = []
    try:
        _unshare_net()
        # No IPv6 in the link namespace: a tap would send router solicitations to the qube.
        for conf in ("default", "all"):
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                f.write("1")
        ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(int(argv[0])):
            tun, pkt = make_link(ctl, f"link{i}")
            fds += [tun, pkt.detach()]
    except OSError as e:
        sock.send(f"error: {e}".encode()[:500])
        return 1
    sock.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return 0


async def open_links(count: int) -> list[tuple[int, socket.socket]]:
    """``count`` links in a new namespace: [(QEMU's tap descriptor, the relay's packet socket)]."""
    fds = await run_for_fds([], "bulkhead.network.link", [str(count)], 2 * count,
                            "link helper", LinkError)
    return [(fds[i], socket.socket(fileno=fds[i + 1])) for i in range(0, len(fds), 2)]


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
