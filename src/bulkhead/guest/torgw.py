"""In a Tor gateway (sys-tor, in the role of Whonix-Gateway): its torrc and its nftables.

Every client's TCP is redirected into Tor's TransPort and its DNS (UDP 53, to any
address) into Tor's DNSPort; nothing a client sends is forwarded (no UDP, no
ICMP, no IPv6: no leak around Tor); only Tor's own traffic leaves the gateway.
A client's own firewall rules do not apply here: everything goes through Tor.
Called by :mod:`netconf` when dom0's configuration has a ``tor`` line.
"""

import os

from .netconf import blocked_ruleset, run, write_file

TOR_TRANS_PORT = 9040
TOR_DNS_PORT = 5300


def torrc(own_ip, bridge=None):
    """The Tor gateway's torrc: what a Tor user expects of a transparent gateway."""
    lines = [
        "# Written by Bulkhead: sys-tor, a Tor gateway in the role of Whonix-Gateway.",
        "# Every client's TCP arrives at TransPort, its DNS at DNSPort (nftables redirects);",
        "# nothing else a client sends is forwarded.",
        "User debian-tor",
        "DataDirectory /var/lib/tor",
        "Log notice file /var/log/tor/notices.log",
        "RunAsDaemon 1",
        "PidFile /run/tor/tor.pid",
        "SocksPort 0",
        "TransPort %s:%d IsolateClientAddr IsolateDestAddr" % (own_ip, TOR_TRANS_PORT),
        "DNSPort %s:%d IsolateClientAddr" % (own_ip, TOR_DNS_PORT),
        "VirtualAddrNetworkIPv4 10.192.0.0/10",
        "AutomapHostsOnResolve 1",
        "ClientUseIPv6 0",
    ]
    if bridge:
        lines += ["UseBridges 1", "Bridge %s" % bridge]
    return "\n".join(lines) + "\n"


def render_tor_ruleset(cfg):
    """A Tor gateway: TCP into TransPort, DNS into DNSPort, everything else from a client
    dropped (UDP, ICMP, IPv6: no leak; nothing is forwarded); only the gateway's own
    traffic, Tor's, goes out."""
    clients = cfg["clients"]
    lines = ["flush ruleset", "table inet bulkhead {",
             "  chain antispoof {", "    type filter hook prerouting priority raw; policy accept;"]
    for vid, (ip, _mac) in sorted(clients.items()):
        lines.append('    iifname "vif%d" ip saddr != %s drop' % (vid, ip))
    lines += ['    iifname "vif*" meta nfproto ipv6 drop', "  }",
              "  chain tor {", "    type nat hook prerouting priority dstnat; policy accept;",
              '    iifname "vif*" udp dport 53 redirect to :%d' % TOR_DNS_PORT,
              '    iifname "vif*" meta l4proto tcp redirect to :%d' % TOR_TRANS_PORT, "  }",
              "  chain input {", "    type filter hook input priority filter; policy accept;",
              '    iifname "vif*" tcp dport %d accept' % TOR_TRANS_PORT,
              '    iifname "vif*" udp dport %d accept' % TOR_DNS_PORT,
              '    iifname "vif*" drop', "  }",
              "  chain forward {", "    type filter hook forward priority filter; policy drop;",
              "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply(cfg):
    """Write the torrc, (re)start Tor, load the gateway's ruleset; -> problems."""
    problems = []
    status, err = run(["/usr/sbin/nft", "-f", "-"], render_tor_ruleset(cfg).encode())
    if status != 0:
        problems.append("nft refused the Tor gateway's ruleset, every client is blocked: " + err)
        run(["/usr/sbin/nft", "-f", "-"], blocked_ruleset(cfg).encode())
    os.makedirs("/run/tor", exist_ok=True)
    os.makedirs("/var/log/tor", exist_ok=True)
    for d in ("/run/tor", "/var/log/tor", "/var/lib/tor"):
        try:
            import pwd  # noqa: PLC0415
            pw = pwd.getpwnam("debian-tor")
            os.makedirs(d, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o700 if d == "/var/lib/tor" else 0o755)
        except (KeyError, OSError) as e:
            problems.append("tor: %s: %s" % (d, e))
    text = torrc(cfg["trunk"][1], None if cfg["tor"] == "online" else cfg["tor"])
    try:
        with open("/etc/tor/torrc") as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:
        write_file("/etc/tor/torrc", text)
    pid = None
    try:
        with open("/run/tor/tor.pid") as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        pid = None
    if pid is None:
        status, err = run(["/usr/bin/tor", "-f", "/etc/tor/torrc"])
        if status != 0:
            problems.append("tor did not start: " + err)
    elif not same:
        os.kill(pid, 1)   # SIGHUP: Tor rereads its torrc
    return problems
