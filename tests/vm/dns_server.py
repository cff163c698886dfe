"""A tiny authoritative DNS server for the test internet (UDP and TCP, A records).

``python3 dns_server.py ADDRESS NAME=IP[,IP...] ...``: a NAME with several
addresses answers them in turn, one per query (TTL 30), as a CDN's name
would, so that two lookups get different answers.  AAAA queries get an
empty answer, unknown names NXDOMAIN.  Prints each answer on stdout.
"""

import socket
import sys


def answer(q, table, turn):
    """The response to query ``q`` (None to ignore it)."""
    if len(q) < 12:
        return None
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
    return header + question + answers


def serve_tcp(addr, table, turn, lock):
    """DNS over TCP: each message behind its 2-byte length; one connection at a time."""
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, 53))
    t.listen(8)
    while True:
        c, _peer = t.accept()
        c.settimeout(5)
        try:
            data = b""
            while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            with lock:
                r = answer(data[2:2 + int.from_bytes(data[:2], "big")], table, turn)
            if r is not None:
                print("tcp", flush=True)
                c.sendall(len(r).to_bytes(2, "big") + r)
        except OSError:
            pass
        finally:
            c.close()


def main() -> None:
    import threading
    addr = sys.argv[1]
    table = {}
    for spec in sys.argv[2:]:
        name, _, ips = spec.partition("=")
        table[name.lower().rstrip(".")] = ips.split(",")
    turn = {name: 0 for name in table}
    lock = threading.Lock()
    threading.Thread(target=serve_tcp, args=(addr, table, turn, lock), daemon=True).start()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        q, peer = s.recvfrom(4096)
        with lock:
            r = answer(q, table, turn)
        if r is not None:
            s.sendto(r, peer)


if __name__ == "__main__":
    main()
