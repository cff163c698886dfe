"""In a netvm: the DNS forwarder that lets hostname firewall rules follow DNS answers.

Qubes resolves a rule's ``dsthost`` name once, so a rule for a name whose
addresses change (a CDN) stops matching (Qubes issues #5225, #4896).  Here
each netvm redirects its clients' UDP DNS (to the virtual servers 10.139.1.1
and .2) to this forwarder, which sends each query on to the netvm's own
upstream and, before handing the answer back, adds the addresses it returned
for a name that one of the asking client's rules names to that rule's
nftables set, with the answer's TTL as the element's timeout.  So the client
may reach exactly the addresses its own lookups returned, for as long as they
are valid, and the answer reaches the client only once the firewall admits them.

Files (written by :mod:`netconf`, re-read when they change)::

    /run/bulkhead/net/dns-upstream   one or two upstream server addresses
    /run/bulkhead/net/dns-track      "CLIENT_IP SET NAME" lines
    /run/bulkhead/net/dns-seen       written here: "SET ADDRESS EXPIRY" (unix time), for
                                     netconf to keep the tracked addresses across a reload

Answers are hostile data (they come from the network): parsed with bounds
checks, only A records whose owner is the asked name or a CNAME of it count,
and a malformed answer is passed on without adding anything.
"""

import os
import select
import socket
import sys
import time

PORT = 5353
STATE = "/run/bulkhead/net"
PIDFILE = STATE + "/dnsproxy.pid"
QUERY_TIMEOUT = 5.0
MAX_PENDING = 256
MIN_TTL = 2          # an answer with TTL 0 must still let the connection that follows through
MAX_TTL = 86400


class Malformed(ValueError):
    pass


def _name(msg, off, depth=0):
    """A (possibly compressed) domain name at ``off`` -> (lowercase name, offset after it)."""
    labels = []
    end = None
    jumps = 0
    while True:
        if off >= len(msg):
            raise Malformed("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise Malformed("truncated pointer")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            if jumps > 32:
                raise Malformed("pointer loop")
            continue
        if n & 0xC0:
            raise Malformed("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(msg):
            raise Malformed("label runs past the message")
        labels.append(msg[off:off + n].decode("ascii", "replace").lower())
        off += n
        if len(labels) > 127:
            raise Malformed("too many labels")
    return ".".join(labels), (end if end is not None else off)


def parse_question(msg):
    """A query or answer -> (id, question name) ; raises Malformed."""
    if len(msg) < 12:
        raise Malformed("shorter than a header")
    if int.from_bytes(msg[4:6], "big") != 1:
        raise Malformed("not exactly one question")
    name, off = _name(msg, 12)
    if off + 4 > len(msg):
        raise Malformed("truncated question")
    return int.from_bytes(msg[0:2], "big"), name, off + 4


def answer_addresses(msg):
    """An answer -> (question name, {address: ttl}) for the A records of that name or its
    CNAME chain; raises Malformed."""
    _id, qname, off = parse_question(msg)
    ancount = int.from_bytes(msg[6:8], "big")
    cnames = {}
    records = []
    for _ in range(min(ancount, 256)):
        owner, off = _name(msg, off)
        if off + 10 > len(msg):
            raise Malformed("truncated record")
        rtype = int.from_bytes(msg[off:off + 2], "big")
        ttl = int.from_bytes(msg[off + 4:off + 8], "big")
        rdlen = int.from_bytes(msg[off + 8:off + 10], "big")
        off += 10
        if off + rdlen > len(msg):
            raise Malformed("record data runs past the message")
        if rtype == 1 and rdlen == 4:
            records.append((owner, "%d.%d.%d.%d" % tuple(msg[off:off + 4]), ttl))
        elif rtype == 5:
            target, _ = _name(msg, off)
            cnames[owner] = target
        off += rdlen
    names = {qname}
    current = qname
    for _ in range(16):
        current = cnames.get(current)
        if current is None or current in names:
            break
        names.add(current)
    out = {}
    for owner, addr, ttl in records:
        if owner in names:
            out[addr] = max(out.get(addr, 0), min(max(ttl, MIN_TTL), MAX_TTL))
    return qname, out


def read_lines(path):
    try:
        with open(path) as f:
            return [ln.split() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return []


class Proxy:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", PORT))
        self.pending = {}     # upstream socket fd -> (socket, client address, deadline)
        self.stamp = None
        self.upstream = []
        self.track = {}       # (client ip, name) -> [set names]
        self.seen = {}        # (set, addr) -> expiry

    def reload(self):
        try:
            stamp = tuple(os.stat("%s/%s" % (STATE, f)).st_mtime_ns
                          for f in ("dns-upstream", "dns-track"))
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return
        self.stamp = stamp
        self.upstream = [w for line in read_lines(STATE + "/dns-upstream") for w in line][:2]
        self.track = {}
        for words in read_lines(STATE + "/dns-track"):
            if len(words) == 3:
                self.track.setdefault((words[0], words[2]), []).append(words[1])

    def query(self, data, client):
        self.reload()
        if not self.upstream or len(self.pending) >= MAX_PENDING:
            return
        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            up.connect((self.upstream[0], 53))
            up.send(data)
        except OSError:
            up.close()
            return
        self.pending[up.fileno()] = (up, client, time.monotonic() + QUERY_TIMEOUT)

    def answer(self, fd):
        up, client, _ = self.pending.pop(fd)
        try:
            data = up.recv(65535)
        except OSError:
            data = b""
        up.close()
        if not data:
            return
        try:
            qname, addrs = answer_addresses(data)
        except Malformed:
            addrs = {}
            qname = ""
        sets = self.track.get((client[0], qname), []) if addrs else []
        if sets:
            self.admit(sets, addrs)
        try:
            self.sock.sendto(data, client)
        except OSError:
            pass

    def admit(self, sets, addrs):
        """Add the addresses to the rules' sets (one nft transaction), before the answer goes."""
        from .netconf import run  # noqa: PLC0415

        now = int(time.time())
        cmds = []
        for s in sets:
            for addr, ttl in sorted(addrs.items()):
                cmds += ["add element inet bulkhead %s { %s }" % (s, addr),
                         "delete element inet bulkhead %s { %s }" % (s, addr),
                         "add element inet bulkhead %s { %s timeout %ds }" % (s, addr, ttl)]
                self.seen[(s, addr)] = now + ttl
        status, err = run(["/usr/sbin/nft", "-f", "-"], ("\n".join(cmds) + "\n").encode())
        if status != 0:
            sys.stderr.write("dnsproxy: nft: %s\n" % err[-300:])
        self.seen = {k: v for k, v in self.seen.items() if v > now}
        tmp = STATE + "/dns-seen.tmp"
        with open(tmp, "w") as f:
            f.write("".join("%s %s %d\n" % (s, a, e) for (s, a), e in self.seen.items()))
        os.replace(tmp, STATE + "/dns-seen")

    def run(self):
        while True:
            fds = [self.sock] + [p[0] for p in self.pending.values()]
            ready, _, _ = select.select(fds, [], [], 1.0)
            for s in ready:
                if s is self.sock:
                    try:
                        data, client = self.sock.recvfrom(4096)
                    except OSError:
                        continue
                    self.query(data, client)
                elif s.fileno() in self.pending:
                    self.answer(s.fileno())
            now = time.monotonic()
            for fd, (up, _c, deadline) in list(self.pending.items()):
                if deadline < now:
                    del self.pending[fd]
                    up.close()


def running():
    try:
        with open(PIDFILE) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"dnsproxy" in f.read()
    except (OSError, ValueError):
        return False


def ensure_running():
    """Start the forwarder (detached from the agent) unless it runs."""
    if running():
        return
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        fd = os.open("/dev/null", os.O_RDWR)
        for i in (0, 1):
            os.dup2(fd, i)
        log = os.open("/run/bulkhead/net/dnsproxy.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 2)
        os.closerange(3, 1024)
        os.execv(sys.executable, [sys.executable, "-c",
                                  "import sys; sys.path.insert(0, '/usr/lib/bulkhead'); "
                                  "sys.argv[0] = 'dnsproxy'; "
                                  "from bulkhead_guest import dnsproxy; dnsproxy.main()"])
    finally:
        os._exit(127)


def main():
    with open(PIDFILE, "w") as f:
        f.write("%d\n" % os.getpid())
    Proxy().run()
