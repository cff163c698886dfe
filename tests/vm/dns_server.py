"""A tiny authoritative DNS server for the test internet (UDP only, A records).

``python3 dns_server.py ADDRESS NAME=IP[,IP...] ...``: a NAME with several
addresses answers them in turn, one per query (TTL 30), as a CDN's name
would, so that two lookups get different answers.  AAAA queries get an
empty answer, unknown names NXDOMAIN.  Prints each answer on stdout.
"""

import socket
import sys


def main() -> None:
    addr = sys.argv[1]
    table = {}
    for spec in sys.argv[2:]:
        name, _, ips = spec.partition("=")
        table[name.lower().rstrip(".")] = ips.split(",")
    turn = {name: 0 for name in table}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        q, peer = s.recvfrom(4096)
        if len(q) < 12:
            continue
        off, labels = 12, []
        while off < len(q) and q[off]:
            labels.append(q[off + 1:off + 1 + q[off]].decode(errors="replace"))
            off += 1 + q[off]
        qname = ".".join(labels).lower()
        qtype = int.from_bytes(q[off + 1:off + 3], "big")
        question = q[12:off + 5]
        answers = b""
        rcode = 0
        count = 0
        if qname in table:
            if qtype == 1:
                ips = table[qname]
                ip = ips[turn[qname] % len(ips)]
                turn[qname] += 1
                answers = (b"\xc0\x0c\x00\x01\x00\x01" + (30).to_bytes(4, "big") + b"\x00\x04"
                           + bytes(int(x) for x in ip.split(".")))
                count = 1
                print(qname, ip, flush=True)
        else:
            rcode = 3
        header = q[0:2] + bytes([0x84 | (q[2] & 0x01), 0x80 | rcode]) + b"\x00\x01" \
            + count.to_bytes(2, "big") + b"\x00\x00\x00\x00"
        s.sendto(header + question + answers, peer)


if __name__ == "__main__":
    main()
