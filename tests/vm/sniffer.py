"""Record every IPv4 packet a device receives (run inside the test internet, on sys-net's
tap): one line ``PROTO SRC DST DPORT`` each, flushed at once; an IPv6 one as the line
``ipv6 SRC DST NEXTHEADER``.  ``python3 sniffer.py DEV``."""

import socket
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main() -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((sys.argv[1], 0))
    while True:
        frame, addr = s.recvfrom(65535)
        if addr[2] == PACKET_OUTGOING:
            continue
        if frame[12:14] == b"\x86\xdd":
            ip6 = frame[14:]
            print("ipv6", socket.inet_ntop(socket.AF_INET6, ip6[8:24]),
                  socket.inet_ntop(socket.AF_INET6, ip6[24:40]), ip6[6], flush=True)
            continue
        if frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        proto = ip[9]
        src = socket.inet_ntoa(ip[12:16])
        dst = socket.inet_ntoa(ip[16:20])
        dport = int.from_bytes(ip[ihl + 2:ihl + 4], "big") if proto in (6, 17) else 0
        print({6: "tcp", 17: "udp", 1: "icmp"}.get(proto, str(proto)), src, dst, dport,
              flush=True)


if __name__ == "__main__":
    main()
