"""In a qube: apply the network configuration dom0 pushes (in the role of QubesDB).

dom0 sends this qube's whole network state as a few lines of text on the stdin
of the built-in call ``bulkhead.NetConfig`` (only dom0 can make it: the agent
refuses it from any other source); this module, run in a child the agent
forks, turns it into ``ip`` commands and one atomic nftables ruleset.  Every
call carries the complete state, so applying is idempotent and a lost call is
repaired by the next.

The lines (each word checked, anything else refused)::

    link MAC IP GATEWAY          this qube's own interface (by MAC): IP/32, default
                                 route via GATEWAY (whose MAC is the fixed fe:ff:ff:ff:ff:ff)
    nolink                       no netvm (any more): the interface loses its address
    trunk MAC IP                 this qube gives network: the NIC towards dom0's VLAN
                                 relay (by MAC), IP its own address on each vif
    uplink MAC CIDR GATEWAY      sys-net's uplink (bridge mode): static address and route
    dns A [B]                    where the virtual DNS servers are redirected (DNAT);
                                 absent: DNS goes on upstream unchanged (to our netvm)
    client VID IP MAC            one client: vif<VID> on VLAN VID, its address and MAC
    rule VID RULE                its firewall rules, in order (Qubes' line format)
    norules VID                  a client whose rules dom0 could not give: blocked
    tor online | tor bridge A:P  this netvm is a Tor gateway: every client's TCP goes into
                                 Tor's TransPort, its DNS into Tor's DNSPort, nothing else
                                 passes; ``bridge``: Tor reaches the network only through
                                 the bridge A:P (a censored user's setting, and the tests')

The firewall (nftables, one table ``inet bulkhead``): per client, anti-spoofing
(only its own address may come in on its vif), no client-to-client traffic,
established connections pass, new ones go through chain ``fw-VID`` (first match
wins, then an implicit reject with icmp admin-prohibited).  A client whose rules
cannot be used (a host name that does not resolve, a broken line) is blocked
entirely (fail closed), and the call's exit status and stderr say why.  The
connection-tracking entries of a client whose rules changed are flushed, so
that established connections are judged again by the new rules.

Imports only builtins (plus ``socket`` to resolve host names): it runs in a
child of the agent, under TCG, and must be quick.
"""

import os
import sys

from . import fwrules

VIRTUAL_DNS = ("10.139.1.1", "10.139.1.2")
GATEWAY_MAC = "fe:ff:ff:ff:ff:ff"
LINK_MTU = 65520
PROXY_PORT = 5353   # the DNS forwarder (dnsproxy.PORT), not imported: it needs socket
TRUNK_MTU = 65535
STATE_DIR = "/run/bulkhead/net"
MAX_INPUT = 256 * 1024
MAX_CLIENTS = 254
_HEX = frozenset("0123456789abcdef")


class ConfigError(ValueError):
    pass


# --- parsing (pure) -------------------------------------------------------------------
def _ip(text, what):
    if fwrules.parse_cidr4(text) != text + "/32":
        raise ConfigError("%s: %r is not an IPv4 address" % (what, text[:20]))
    return text


def _mac(text, what):
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and set(p) <= _HEX for p in parts):
        raise ConfigError("%s: %r is not a MAC address" % (what, text[:20]))
    return text


def _vid(text):
    if not text.isdigit() or len(text) > 3 or not 0 < int(text) <= MAX_CLIENTS:
        raise ConfigError("client VLAN id %r is not 1-%d" % (text[:8], MAX_CLIENTS))
    return int(text)


def parse_config(text):
    """The lines above -> a dict; raises ConfigError naming the bad line."""
    cfg = {"link": None, "nolink": False, "trunk": None, "uplink": None, "dns": [],
           "clients": {}, "rules": {}, "blocked": {}, "tor": None}
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        word, _, rest = line.partition(" ")
        args = rest.split()
        try:
            if word == "link" and len(args) == 3:
                cfg["link"] = (_mac(args[0], "link"), _ip(args[1], "link"), _ip(args[2], "gateway"))
            elif word == "nolink" and not args:
                cfg["nolink"] = True
            elif word == "trunk" and len(args) == 2:
                cfg["trunk"] = (_mac(args[0], "trunk"), _ip(args[1], "trunk"))
            elif word == "uplink" and len(args) == 3:
                if "/" not in args[1] or fwrules.parse_cidr4(args[1]) is None:
                    raise ConfigError("uplink: %r is not ADDRESS/PREFIX" % args[1][:24])
                _ip(args[1].partition("/")[0], "uplink")
                cfg["uplink"] = (_mac(args[0], "uplink"), args[1], _ip(args[2], "uplink gateway"))
            elif word == "dns" and 1 <= len(args) <= 2:
                cfg["dns"] = [_ip(a, "dns") for a in args]
            elif word == "client" and len(args) == 3:
                vid = _vid(args[0])
                cfg["clients"][vid] = (_ip(args[1], "client"), _mac(args[2], "client"))
            elif word == "rule" and args:
                vid = _vid(args[0])
                rule_text = rest.partition(" ")[2]
                try:
                    cfg["rules"].setdefault(vid, []).append(fwrules.parse_rule(rule_text))
                except fwrules.RuleError as e:
                    cfg["blocked"][vid] = "rule %d: %s" % (len(cfg["rules"].get(vid, [])) + 1, e)
            elif word == "tor" and args == ["online"]:
                cfg["tor"] = "online"
            elif word == "tor" and len(args) == 2 and args[0] == "bridge":
                host, _, port = args[1].partition(":")
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise ConfigError("tor bridge: %r is not ADDRESS:PORT" % args[1][:30])
                cfg["tor"] = "%s:%d" % (_ip(host, "tor bridge"), int(port))
            elif word == "norules" and len(args) == 1:
                cfg["blocked"][_vid(args[0])] = "dom0 gave no usable rules"
            else:
                raise ConfigError("unknown or malformed line")
        except ConfigError as e:
            raise ConfigError("line %d (%s): %s" % (n, word[:12], e)) from None
    for vid in list(cfg["rules"]) + list(cfg["blocked"]):
        if vid not in cfg["clients"]:
            raise ConfigError("rules for VLAN %d, which is no client" % vid)
    return cfg


# --- nftables (pure, but for the resolver it is given) ----------------------------------
def _ports(value):
    lo, _, hi = value.partition("-")
    return lo if lo == hi else value


def render_rule(rule, resolve, setname=None):
    """One parsed rule -> nft statements; raises ConfigError (fail closed).

    A host name becomes two statements: its addresses resolved here now (as Qubes
    does; a name that does not resolve blocks the client), and the set ``setname``
    that the DNS forwarder fills with what the client's own lookups return."""
    parts = []
    kind = rule.get("dstkind")
    dests = [None]
    if "dsthost" in rule:
        if kind == "dst4":
            parts.append("ip daddr %s" % rule["dsthost"])
        elif kind == "dst6":
            parts.append("ip6 daddr %s" % rule["dsthost"])
        else:
            addrs = resolve(rule["dsthost"])
            if not addrs:
                raise ConfigError("dsthost %s: the name does not resolve" % rule["dsthost"])
            dests = ["ip daddr { %s }" % ", ".join(sorted(addrs))]
            if setname:
                dests.append("ip daddr @%s" % setname)
    if rule.get("specialtarget") == "dns":
        # The address the client asked for, before a DNAT to the real server.
        parts.append("ct original ip daddr { %s }" % ", ".join(VIRTUAL_DNS))
        if "proto" not in rule:
            parts.append("meta l4proto { tcp, udp } th dport 53")
    proto = rule.get("proto")
    if proto:
        parts.append("meta l4proto %s" % proto)
        if "dstports" in rule:
            parts.append("%s dport %s" % (proto, _ports(rule["dstports"])))
        elif rule.get("specialtarget") == "dns" and proto in ("tcp", "udp"):
            parts.append("%s dport 53" % proto)
        if "icmptype" in rule:
            parts.append("icmp type %s" % rule["icmptype"])
    parts.append("accept" if rule["action"] == "accept"
                 else "reject with icmpx type admin-prohibited")
    return [" ".join(([d] if d else []) + parts) for d in dests]


def client_chain(vid, rules, resolve, now, sets=None):
    """The statements of chain fw-VID; raises ConfigError if any rule cannot be used.
    ``sets``: filled with {set name: host name} for the rules that track DNS answers."""
    out = []
    for i, rule in enumerate(rules, 1):
        if "expire" in rule and int(rule["expire"]) <= now:
            continue
        setname = None
        if sets is not None and rule.get("dstkind") == "dsthost":
            setname = "h%d_%d" % (vid, i)
        try:
            out += render_rule(rule, resolve, setname)
        except ConfigError as e:
            raise ConfigError("rule %d: %s" % (i, e)) from None
        if setname:
            sets[setname] = rule["dsthost"]
    out.append("reject with icmpx type admin-prohibited")
    return out


def render_ruleset(cfg, upstream, chains, sets=None, seen=(), now=0, proxy=None):
    """The whole ruleset.  ``upstream``: the interface clients' traffic leaves by (NAT),
    or None; ``chains``: VID -> statements (a blocked client gets only the reject);
    ``sets``: the DNS-tracked sets, ``seen``: (set, address, expiry) they held;
    ``proxy``: the address of this netvm's DNS forwarder (its UDP DNS goes there)."""
    clients = cfg["clients"]
    lines = ["flush ruleset", "table inet bulkhead {"]
    for name in sorted(sets or {}):
        elements = ["%s timeout %ds" % (addr, expiry - now) for s, addr, expiry in seen
                    if s == name and expiry - now >= 1]
        lines.append("  set %s { type ipv4_addr; flags timeout;%s }"
                     % (name, " elements = { %s };" % ", ".join(elements) if elements else ""))
    lines += ["  chain antispoof {", "    type filter hook prerouting priority raw; policy accept;"]
    for vid, (ip, _mac) in sorted(clients.items()):
        lines.append('    iifname "vif%d" ip saddr != %s drop' % (vid, ip))
        lines.append('    iifname "vif%d" meta nfproto ipv6 drop' % vid)
    lines.append("  }")
    lines += ["  chain dns {", "    type nat hook prerouting priority dstnat; policy accept;"]
    dns = cfg["dns"]
    for i, virtual in enumerate(VIRTUAL_DNS if clients else ()):
        if proxy:
            lines.append('    iifname "vif*" ip daddr %s udp dport 53 dnat ip to %s:%d'
                         % (virtual, proxy, PROXY_PORT))
        if dns:
            real = dns[min(i, len(dns) - 1)]
            lines.append('    iifname "vif*" ip daddr %s meta l4proto { tcp, udp } th dport 53 '
                         "dnat ip to %s" % (virtual, real))
    lines.append("  }")
    lines += ["  chain nat {", "    type nat hook postrouting priority srcnat; policy accept;"]
    if upstream and clients:
        lines.append('    oifname "%s" masquerade' % upstream)
    lines.append("  }")
    lines += ["  chain input {", "    type filter hook input priority filter; policy accept;",
              '    iifname "vif*" ct state established,related accept',
              '    iifname "vif*" meta l4proto icmp accept',
              '    iifname "vif*" udp dport %d accept' % PROXY_PORT,
              '    iifname "vif*" drop', "  }"]
    lines += ["  chain forward {", "    type filter hook forward priority filter; policy drop;",
              "    ct state invalid drop",
              "    ct state established,related accept",
              '    iifname "vif*" oifname "vif*" drop']
    for vid in sorted(clients):
        lines.append('    iifname "vif%d" jump fw-%d' % (vid, vid))
    lines.append("  }")
    for vid in sorted(clients):
        lines.append("  chain fw-%d {" % vid)
        lines += ["    " + s for s in chains[vid]]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def blocked_ruleset(cfg):
    """What stays when the real ruleset could not be loaded: no client gets anything through."""
    return ("flush ruleset\ntable inet bulkhead {\n"
            "  chain forward { type filter hook forward priority filter; policy drop; }\n"
            "  chain input { type filter hook input priority filter; policy accept;\n"
            '    iifname "vif*" drop\n  }\n}\n')


def rules_digest(cfg, vid):
    """What changed for a client (to flush its connection tracking)."""
    lines = [fwrules.format_rule(r) for r in cfg["rules"].get(vid, [])]
    if vid in cfg["blocked"]:
        lines.append("BLOCKED " + cfg["blocked"][vid])
    return "\n".join(lines)


# --- applying (in the qube, as root) -----------------------------------------------------
def run(argv, stdin=b""):
    """Run a program; returns (status, stderr text).  No shell, fixed paths."""
    in_r, in_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(in_r, 0)
            os.dup2(err_w, 2)
            fd = os.open("/dev/null", os.O_WRONLY)
            os.dup2(fd, 1)
            os.closerange(3, 1024)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(in_r)
    os.close(err_w)
    view = memoryview(stdin)
    while view:
        view = view[os.write(in_w, view[:65536]):]
    os.close(in_w)
    err = b""
    while True:
        chunk = os.read(err_r, 65536)
        if not chunk:
            break
        err = (err + chunk)[-4000:]
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err.decode("utf-8", "replace").strip()


def interfaces():
    """name -> MAC of this qube's network interfaces."""
    out = {}
    for name in os.listdir("/sys/class/net"):
        try:
            with open("/sys/class/net/%s/address" % name) as f:
                out[name] = f.read().strip()
        except OSError:
            continue
    return out


def by_mac(ifaces, mac, what):
    for name, addr in ifaces.items():
        if addr == mac and not name.startswith("vif"):
            return name
    raise ConfigError("no network interface with MAC %s (%s)" % (mac, what))


def write_file(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sysctl(key, value):
    try:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)
    except OSError:
        pass


def ip_commands(cfg, ifaces):
    """The ``ip -batch`` lines that bring the links to the state asked; -> (lines, upstream)."""
    cmds = []
    upstream = None
    if cfg["uplink"]:
        mac, cidr, gw = cfg["uplink"]
        dev = by_mac(ifaces, mac, "uplink")
        cmds += ["link set %s up" % dev, "addr replace %s dev %s" % (cidr, dev),
                 "route replace default via %s dev %s" % (gw, dev)]
        upstream = dev
    link = cfg["link"]
    if link:
        mac, ip, gw = link
        dev = by_mac(ifaces, mac, "link")
        cmds += ["link set %s mtu %d up" % (dev, LINK_MTU), "addr flush dev %s" % dev,
                 "addr add %s/32 dev %s" % (ip, dev),
                 "neigh replace %s lladdr %s dev %s nud permanent" % (gw, GATEWAY_MAC, dev),
                 "route replace %s/32 dev %s scope link" % (gw, dev),
                 "route replace default via %s dev %s onlink" % (gw, dev)]
        upstream = upstream or dev
    trunk = cfg["trunk"]
    if trunk:
        mac, own_ip = trunk
        dev = by_mac(ifaces, mac, "trunk")
        # Its own address on the trunk too: what it serves (Tor's ports, the DNS forwarder)
        # can bind to it before the first client's vif exists.
        cmds += ["link set %s mtu %d up" % (dev, TRUNK_MTU),
                 "addr replace %s/32 dev %s" % (own_ip, dev)]
        existing = {int(n[3:]) for n in ifaces if n.startswith("vif") and n[3:].isdigit()}
        for vid in sorted(existing - set(cfg["clients"])):
            cmds.append("link del vif%d" % vid)
        for vid, (ip, cmac) in sorted(cfg["clients"].items()):
            vif = "vif%d" % vid
            if vid not in existing:
                cmds.append("link add link %s name %s address %s mtu %d type vlan id %d"
                            % (dev, vif, GATEWAY_MAC, LINK_MTU, vid))
            cmds += ["link set %s up" % vif, "addr replace %s/32 dev %s" % (own_ip, vif),
                     "neigh replace %s lladdr %s dev %s nud permanent" % (ip, cmac, vif),
                     "route replace %s/32 dev %s scope link src %s" % (ip, vif, own_ip)]
    return cmds, upstream


def resolver():
    import socket  # noqa: PLC0415 -- only rules with host names need it

    cache = {}

    def resolve(name):
        if name not in cache:
            try:
                infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
                cache[name] = {i[4][0] for i in infos}
            except OSError:
                cache[name] = set()
        return cache[name]
    return resolve


def apply(cfg, now):
    """Bring this qube to ``cfg``; returns the list of problems (empty: all applied)."""
    problems = []
    ifaces = interfaces()
    if cfg["nolink"]:
        for name in ifaces:
            if name.startswith("eth"):
                run(["/sbin/ip", "addr", "flush", "dev", name])
                run(["/sbin/ip", "route", "flush", "dev", name])
    cmds, upstream = ip_commands(cfg, ifaces)
    if cfg["trunk"]:
        # Before any link comes up: a netvm speaks no IPv6 (no router solicitations either).
        sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        sysctl("net.ipv6.conf.default.disable_ipv6", "1")
    if cmds:
        status, err = run(["/sbin/ip", "-force", "-batch", "-"], ("\n".join(cmds) + "\n").encode())
        if status != 0:
            problems.append("ip: " + err)
    if cfg["link"] or cfg["nolink"]:
        resolv = "".join("nameserver %s\n" % a for a in VIRTUAL_DNS) if cfg["link"] else ""
        write_file("/etc/resolv.conf", resolv)
    elif cfg["uplink"] and cfg["dns"]:
        write_file("/etc/resolv.conf", "".join("nameserver %s\n" % a for a in cfg["dns"]))
    if not cfg["trunk"]:
        return problems
    sysctl("net.ipv4.ip_forward", "0" if cfg["tor"] else "1")
    sysctl("net.ipv4.conf.all.rp_filter", "1")
    if cfg["tor"]:
        from . import torgw  # noqa: PLC0415 -- only a Tor gateway needs it
        return problems + torgw.apply(cfg)
    resolve = resolver()
    chains = {}
    sets = {}
    track = []
    for vid, (client_ip, _mac) in cfg["clients"].items():
        if vid in cfg["blocked"]:
            problems.append("client %d blocked: %s" % (vid, cfg["blocked"][vid]))
            chains[vid] = ["reject with icmpx type admin-prohibited"]
            continue
        mine = {}
        try:
            chains[vid] = client_chain(vid, cfg["rules"].get(vid, []), resolve, now, mine)
        except ConfigError as e:
            problems.append("client %d blocked: %s" % (vid, e))
            cfg["blocked"][vid] = str(e)
            chains[vid] = ["reject with icmpx type admin-prohibited"]
            continue
        sets.update(mine)
        track += ["%s %s %s\n" % (client_ip, name, host) for name, host in sorted(mine.items())]
    # The DNS forwarder: where it sends queries, which answers it tracks for whom.
    os.makedirs(STATE_DIR, exist_ok=True)
    upstream_dns = cfg["dns"] or (list(VIRTUAL_DNS) if cfg["link"] else [])
    write_file(STATE_DIR + "/dns-upstream", "".join(a + "\n" for a in upstream_dns))
    write_file(STATE_DIR + "/dns-track", "".join(track))
    seen = []
    for words in _read_words(STATE_DIR + "/dns-seen"):
        if len(words) == 3 and words[0] in sets and words[2].isdigit() \
                and fwrules.parse_cidr4(words[1]) == words[1] + "/32":
            seen.append((words[0], words[1], int(words[2])))
    proxy = cfg["trunk"][1] if upstream_dns else None
    ruleset = render_ruleset(cfg, upstream, chains, sets, seen, now, proxy)
    status, err = run(["/usr/sbin/nft", "-f", "-"], ruleset.encode())
    if status != 0:
        problems.append("nft refused the ruleset, every client is blocked: " + err)
        run(["/usr/sbin/nft", "-f", "-"], blocked_ruleset(cfg).encode())
    flush_changed(cfg)
    if proxy:
        from . import dnsproxy  # noqa: PLC0415 -- needs socket; only netvms start it
        dnsproxy.ensure_running()
    return problems


def _read_words(path):
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines()]
    except OSError:
        return []


def flush_changed(cfg):
    """Flush the connection tracking of each client whose rules changed since last time."""
    os.makedirs(STATE_DIR, exist_ok=True)
    for vid, (ip, _mac) in cfg["clients"].items():
        path = "%s/rules-%d" % (STATE_DIR, vid)
        digest = ip + "\n" + rules_digest(cfg, vid)
        try:
            with open(path) as f:
                old = f.read()
        except OSError:
            old = None
        if old == digest:
            continue
        if old is not None:
            run(["/usr/sbin/conntrack", "-D", "-s", ip])
        write_file(path, digest)


def main():
    data = b""
    while len(data) <= MAX_INPUT:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_INPUT:
        sys.stderr.write("configuration larger than %d bytes\n" % MAX_INPUT)
        return 2
    try:
        cfg = parse_config(data.decode("ascii"))
    except (UnicodeDecodeError, ConfigError) as e:
        sys.stderr.write("bad configuration: %s\n" % e)
        return 2
    import time  # noqa: PLC0415

    problems = apply(cfg, int(time.time()))
    for p in problems:
        sys.stderr.write(p + "\n")
    sys.stderr.flush()
    return 1 if problems else 0
