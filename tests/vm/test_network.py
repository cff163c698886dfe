"""Networking against real qubes and real packets: sys-net -> sys-firewall -> AppVMs,
per-qube firewalls enforced with nftables in the netvm, the uplink into a namespace the
test made ("the internet"), dom0 with nothing but ``lo``."""

from __future__ import annotations

import time

import pytest
from internet import PAGE, SERVER, SUBNET, make_internet

from bulkhead.netns import interfaces

pytestmark = pytest.mark.vm

# busybox-static's wget crashes in its static resolver; nc speaks enough HTTP/1.0.
FETCH = (f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {SERVER} 80 "
         "| sed '1,/^\\r$/d'")


@pytest.fixture(scope="module")
def internet(bulkhead, tmp_path_factory):
    net = make_internet(tmp_path_factory.mktemp("internet"),
                        dns={"cdn.test": [f"{SUBNET}.3", f"{SUBNET}.4"]})
    for qube in ("work", "personal", "untrusted", "sys-firewall", "sys-net"):
        bulkhead.tool("qvm-shutdown", "--wait", "--force", qube, check=False)
    before = {key: bulkhead.tool("qvm-features", "sys-net", key, check=False).stdout.strip()
              for key in net.features()}
    for key, value in net.features().items():
        bulkhead.tool("qvm-features", "sys-net", key, value)
    yield net
    for qube in ("work", "personal", "sys-firewall", "sys-net"):
        bulkhead.tool("qvm-kill", qube, check=False)
    net.close()
    # The namespace is gone: sys-net gets back the uplink it had (the session's: none),
    # so that the tests after these can still start it.
    for key, value in before.items():
        if value:
            bulkhead.tool("qvm-features", "sys-net", key, value)
        else:
            bulkhead.tool("qvm-features", "--unset", "sys-net", key)


@pytest.fixture(scope="module")
def online(bulkhead, internet):
    for qube in ("work", "personal"):
        bulkhead.ensure_running(qube)
    return internet


def fetch(bulkhead, qube: str, server: str = SERVER) -> str | None:
    r = bulkhead.run(qube, FETCH.replace(SERVER, server), check=False)
    return r.stdout if r.returncode == 0 and r.stdout else None


def test_work_fetches_a_page_through_sys_firewall_and_sys_net(bulkhead, online):
    assert fetch(bulkhead, "work") == PAGE.decode()
    assert fetch(bulkhead, "personal") == PAGE.decode()


def test_addresses_as_qubes_derives_them(bulkhead, online):
    app = bulkhead.app()
    work = app.domains["work"]
    fw = app.domains["sys-firewall"]
    qid = int(work.qid)
    assert work.ip == f"10.137.{qid >> 8}.{qid & 255}"
    assert work.visible_gateway == fw.ip
    assert work.visible_netmask == "255.255.255.255"
    shown = bulkhead.run("work", "ip -4 -o addr show; ip route").stdout
    assert f"{work.ip}/32" in shown and f"default via {fw.ip}" in shown
    rows = bulkhead.tool("qvm-ls", "-O", "name,ip,gateway").stdout
    assert any(line.split() == ["work", work.ip, fw.ip] for line in rows.splitlines())
    rows = bulkhead.tool("qvm-ls", "--format", "network").stdout.splitlines()
    assert rows[0].split()[:6] == ["NAME", "STATE", "NETVM", "IP", "IPBACK", "GATEWAY"]
    work_row = [line.split() for line in rows if line.split()[:1] == ["work"]][0]
    assert work_row[2:4] == ["sys-firewall", work.ip] and work_row[-1] == fw.ip


def test_vault_has_only_lo(bulkhead, online):
    bulkhead.ensure_running("vault")
    names = bulkhead.run("vault", "ls /sys/class/net").stdout.split()
    # (The qube kernel has no IPv6-in-IPv4 tunnels: no fallback "sit0" device either.)
    assert names == ["lo"]
    assert "eth" not in bulkhead.run("vault", "ip -o addr; ip route", check=False).stdout
    assert not bulkhead.run("vault", "ls /sys/class/net/*/device 2>/dev/null",
                            check=False).stdout.strip()
    # A running qube that started without a network device cannot be given one live.
    r = bulkhead.tool("qvm-prefs", "vault", "netvm", "sys-firewall", check=False)
    assert r.returncode != 0 and "start it again" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dom0_and_every_qemu_see_only_lo(bulkhead, online):
    assert interfaces(bulkhead.daemon_pid()) == ["lo"]
    for qube in ("sys-net", "sys-firewall", "work"):
        assert interfaces(bulkhead.qemu_pid(qube)) == ["lo"], qube


def test_work_cannot_reach_personal_nor_spoof(bulkhead, online):
    app = bulkhead.app()
    personal_ip = app.domains["personal"].ip
    # personal listens; work tries to connect to it directly
    bulkhead.run("personal", "busybox nc -l -p 7000 -e true >/dev/null 2>&1 & sleep 0.2", user="root")
    r = bulkhead.run("work", f"busybox nc -w 3 {personal_ip} 7000 </dev/null && echo connected",
                     check=False)
    assert "connected" not in r.stdout
    # a forged source address: nothing comes back, and sys-firewall's counter of
    # spoofed drops... the server in the internet sees no packet from it
    r = bulkhead.run("work", "ip addr add 10.137.0.250/32 dev eth0 && "
                             "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | "
                             f"busybox nc -w 3 -s 10.137.0.250 {SERVER} 80 || true",
                     user="root", check=False)
    bulkhead.run("work", "ip addr del 10.137.0.250/32 dev eth0", user="root", check=False)
    assert PAGE.decode() not in r.stdout


def test_firewall_drop_then_reset(bulkhead, online):
    assert fetch(bulkhead, "work") == PAGE.decode()
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "drop", f"dsthost={SERVER}")
    try:
        assert fetch(bulkhead, "work") is None
        assert fetch(bulkhead, "personal") == PAGE.decode()
        listed = bulkhead.tool("qvm-firewall", "work", "list", "--raw").stdout
        assert listed.splitlines()[0] == f"action=drop dst4={SERVER}/32"
    finally:
        bulkhead.tool("qvm-firewall", "work", "reset")
    assert fetch(bulkhead, "work") == PAGE.decode()


def test_unusable_rule_blocks_the_client_and_is_logged(bulkhead, online):
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "accept",
                  "dsthost=no-such-host.invalid")
    try:
        assert fetch(bulkhead, "work") is None
        assert fetch(bulkhead, "personal") == PAGE.decode()
        assert "no-such-host.invalid" in bulkhead.daemon_log()
    finally:
        bulkhead.tool("qvm-firewall", "work", "reset")
    assert fetch(bulkhead, "work") == PAGE.decode()


def test_expired_rule_drops_out_on_time(bulkhead, online):
    until = int(time.time()) + 8
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "drop",
                  f"dsthost={SERVER}", f"expire={until}")
    try:
        assert fetch(bulkhead, "work") is None
        while time.time() < until + 1.5:
            time.sleep(0.5)
        assert fetch(bulkhead, "work") == PAGE.decode()
    finally:
        bulkhead.tool("qvm-firewall", "work", "reset")


def test_switching_netvm_of_a_running_qube(bulkhead, online):
    app = bulkhead.app()
    bulkhead.tool("qvm-prefs", "work", "netvm", "sys-net")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if app.domains["work"].visible_gateway == app.domains["sys-net"].ip and \
                    fetch(bulkhead, "work") == PAGE.decode():
                break
            time.sleep(1)
        route = bulkhead.run("work", "ip route").stdout
        assert f"default via {app.domains['sys-net'].ip}" in route
        assert fetch(bulkhead, "work") == PAGE.decode()
    finally:
        bulkhead.tool("qvm-prefs", "--default", "work", "netvm")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and fetch(bulkhead, "work") != PAGE.decode():
        time.sleep(1)
    assert f"default via {app.domains['sys-firewall'].ip}" in bulkhead.run("work", "ip route").stdout
    assert fetch(bulkhead, "work") == PAGE.decode()


def test_hostname_rule_follows_the_dns_answers_the_client_got(bulkhead, online):
    """Qubes resolves a rule's name once; here the firewall qube admits what each of the
    client's own lookups returned.  The test DNS server answers cdn.test with .3 and .4
    in turn, so the address the firewall qube itself resolved and the ones work gets
    differ: each must be reachable right after work's lookup returned it."""
    bulkhead.tool("qvm-firewall", "work", "reset")
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "accept", "dsthost=cdn.test")
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "accept",
                  "specialtarget=dns")
    bulkhead.tool("qvm-firewall", "work", "del", "--rule-no", "2")   # the final accept
    try:
        assert fetch(bulkhead, "work") is None            # not in any answer: dropped
        lookup = "python3 -c \"import socket; print(socket.gethostbyname('cdn.test'))\""
        first = bulkhead.run("work", lookup).stdout.strip()
        assert fetch(bulkhead, "work", first) == PAGE.decode()
        second = bulkhead.run("work", lookup).stdout.strip()
        assert {first, second} == {f"{SUBNET}.3", f"{SUBNET}.4"}
        assert fetch(bulkhead, "work", second) == PAGE.decode()
        assert fetch(bulkhead, "work") is None
        # personal's rules name no host: its lookups add nothing for work
    finally:
        bulkhead.tool("qvm-firewall", "work", "reset")


ECHO_SERVER = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7001)); s.listen(8)
def serve(c):
    while True:
        d = c.recv(100)
        if not d: return
        c.sendall(d)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

ECHO_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7001), timeout=3)
n = 0
try:
    while n < 100:
        s.sendall(b"x"); s.recv(10); n += 1
        if n == 1: print("connected", flush=True)
        time.sleep(0.2)
    print("still up after", n, flush=True)
except OSError as e:
    print("cut after", n, e, flush=True)
"""


def test_a_new_drop_rule_cuts_established_connections(bulkhead, online):
    """Established connections pass the firewall, so a new rule must flush the
    connection tracking of the client: the open connection is judged again, and cut."""
    import subprocess
    import sys

    server = subprocess.Popen(["ip", "netns", "exec", online.netns, sys.executable, "-c",
                               ECHO_SERVER])
    online.procs.append(server)
    time.sleep(1)
    client = subprocess.Popen(
        [*bulkhead.tool_argv("qvm-run"), "-p", "work", f"python3 -c '{ECHO_CLIENT}' {SERVER}"],
        env=bulkhead.env, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "connected"
        bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "drop",
                      f"dsthost={SERVER}")
        line = client.stdout.readline()
        assert line.startswith("cut after"), line
    finally:
        client.kill()
        bulkhead.tool("qvm-firewall", "work", "reset")


UDP_SEND = ("import socket, sys; "
            "socket.socket(2, 2).sendto(b'x', (sys.argv[1], int(sys.argv[2])))")


def _sniff_sys_net(bulkhead, online, log):
    """Record what sys-net sends into the test internet (on its tap there)."""
    import subprocess
    import sys
    from pathlib import Path

    from bulkhead.network.uplink import tap_name

    tap = tap_name(bulkhead.paths.run.name, int(bulkhead.app().domains["sys-net"].qid))
    proc = subprocess.Popen(["ip", "netns", "exec", online.netns, sys.executable,
                             str(Path(__file__).with_name("sniffer.py")), tap],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    online.procs.append(proc)
    time.sleep(1)
    return proc


DNS_TCP = ("import socket, struct, sys; "
           "q = bytes.fromhex('abcd01000001000000000000') + b'\\x03cdn\\x04test\\x00\\x00\\x01\\x00\\x01'; "
           "c = socket.create_connection((sys.argv[1], 53), 5); "
           "c.sendall(struct.pack('!H', len(q)) + q); r = c.recv(4096); "
           "print(socket.inet_ntoa(r[-4:]) if r[2:4] == b'\\xab\\xcd' else 'bad')")


def test_dns_over_tcp_through_the_virtual_servers(bulkhead, online):
    """A client's DNS over TCP to 10.139.1.1 reaches its netvm chain's upstream server
    (the test internet's), and the answer comes back."""
    r = bulkhead.run("work", f"python3 -c \"{DNS_TCP}\" 10.139.1.1")
    assert r.stdout.strip() in (f"{SUBNET}.3", f"{SUBNET}.4"), r.stdout


IPV6_SEND = ("import socket, sys; "
             "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9997))")


def test_a_client_cannot_leak_over_ipv6(bulkhead, online, tmp_path):
    """A client that turns IPv6 on and sends straight at its netvm's MAC gets not one
    IPv6 packet to the uplink: each netvm drops IPv6 from its clients (and speaks none)."""
    log = tmp_path / "sniffed"
    sniffer = _sniff_sys_net(bulkhead, online, log)
    try:
        bulkhead.run("work", "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 "
                     "net.ipv6.conf.eth0.disable_ipv6=0; "
                     "ip -6 addr add 2001:db8:1::5/64 dev eth0 nodad; "
                     "ip -6 route replace default dev eth0; "
                     "ip -6 neigh replace 2001:db8:2::1 lladdr fe:ff:ff:ff:ff:ff dev eth0; "
                     "ip -6 route replace 2001:db8:2::1 dev eth0", user="root")
        before = bulkhead.run("work", "cat /sys/class/net/eth0/statistics/tx_packets").stdout
        for _ in range(3):
            bulkhead.run("work", f"python3 -c \"{IPV6_SEND}\" 2001:db8:2::1", user="root")
        after = bulkhead.run("work", "cat /sys/class/net/eth0/statistics/tx_packets").stdout
        assert int(after) >= int(before) + 3, "work did not send its IPv6 packets"
        bulkhead.run("sys-net", f"python3 -c \"{UDP_SEND}\" {SERVER} 9998", user="root")
        time.sleep(2)
    finally:
        sniffer.kill()
        bulkhead.run("work", "sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1", user="root",
                     check=False)
    sent = log.read_text().splitlines()
    assert "udp 192.0.2.2 " + SERVER + " 9998" in sent, f"the sniffer saw nothing: {sent}"
    assert [line for line in sent if line.startswith("ipv6")] == [], sent


def test_sys_tor_lets_nothing_out_but_tor(bulkhead, online, tmp_path):
    """A client of sys-tor: its TCP lands in Tor's TransPort, its DNS in Tor's DNSPort,
    and not one packet of its own reaches the uplink: all that sys-net sends into the
    test internet is Tor's own attempts to reach its bridge.  (Tor is given a bridge
    inside the test internet where nothing answers: a test must not reach the real
    Tor network.)"""
    # sys-tor runs on a template of its own, Debian's tor added; the others have no tor.
    assert bulkhead.tool("qvm-prefs", "sys-tor", "template").stdout.strip() == "debian-12-tor"
    assert bulkhead.run("work", "test -e /usr/bin/tor || echo none").stdout.strip() == "none"
    bridge = f"{SERVER}:9001"
    bulkhead.tool("qvm-features", "sys-tor", "tor-bridge", bridge)
    bulkhead.tool("qvm-prefs", "sys-tor", "netvm", "sys-net")
    bulkhead.tool("qvm-shutdown", "--wait", "untrusted", check=False)
    bulkhead.tool("qvm-prefs", "untrusted", "netvm", "sys-tor")
    log = tmp_path / "sniffed"
    try:
        bulkhead.ensure_running("untrusted")
        torrc = bulkhead.run("sys-tor", "cat /etc/tor/torrc", user="root").stdout.splitlines()
        tor_ip = bulkhead.app().domains["sys-tor"].ip
        for line in (f"TransPort {tor_ip}:9040 IsolateClientAddr IsolateDestAddr",
                     f"DNSPort {tor_ip}:5300 IsolateClientAddr", "SocksPort 0",
                     "AutomapHostsOnResolve 1", "User debian-tor", "UseBridges 1",
                     f"Bridge {bridge}"):
            assert line in torrc, line
        assert "DisableNetwork 1" not in torrc   # the template's placeholder was replaced
        assert "tor" in bulkhead.run("sys-tor", "cat /proc/$(cat /run/tor/tor.pid)/comm",
                                     user="root").stdout
        # Tor runs as its own user, as Debian's package sets it up
        assert bulkhead.run("sys-tor", "stat -c %U /proc/$(cat /run/tor/tor.pid)",
                            user="root").stdout.strip() == "debian-tor"
        sniffer = _sniff_sys_net(bulkhead, online, log)
        # TCP: accepted, by Tor (which has no circuit: nothing comes back)
        r = bulkhead.run("untrusted", "python3 -c \"import socket; "
                         f"socket.create_connection(('{SERVER}', 80), 3); print('open')\"",
                         check=False)
        assert "open" in r.stdout, "TCP did not reach Tor's TransPort"
        assert fetch(bulkhead, "untrusted") is None
        # UDP, ICMP, DNS to the virtual servers and straight to a server: nowhere
        bulkhead.run("untrusted", f"python3 -c \"{UDP_SEND}\" {SERVER} 9999; "
                                  f"ping -c 2 -W 1 {SERVER}; "
                                  f"python3 -c \"{UDP_SEND}\" {SERVER} 53; "
                                  "python3 -c \"import socket; socket.gethostbyname('cdn.test')\"",
                     user="root", check=False)
        # The control: a packet sys-net itself sends is seen, so the sniffer works.
        bulkhead.run("sys-net", f"python3 -c \"{UDP_SEND}\" {SERVER} 9998", user="root")
        time.sleep(2)
        sniffer.kill()
        sent = [line.split() for line in log.read_text().splitlines()]
        marker = ["udp", "192.0.2.2", SERVER, "9998"]
        assert marker in sent, f"the sniffer did not see sys-net's own packet: {sent}"
        others = [p for p in sent if p != marker
                  and not (p[:2] == ["tcp", "192.0.2.2"] and p[2:] == [SERVER, "9001"])]
        assert others == [], f"sys-net sent more than Tor's own traffic: {others}"
    finally:
        bulkhead.tool("qvm-kill", "untrusted", check=False)
        bulkhead.tool("qvm-prefs", "--default", "untrusted", "netvm")


def test_links_survive_a_daemon_restart(bulkhead, online):
    """The relays outlive a daemon killed at any moment; the next daemon takes them over
    with the qubes: the links keep working, and a firewall change still applies."""
    import signal

    assert fetch(bulkhead, "work") == PAGE.decode()
    bulkhead.kill_daemon(signal.SIGKILL)
    bulkhead.start_daemon()
    assert fetch(bulkhead, "work") == PAGE.decode()
    bulkhead.tool("qvm-firewall", "work", "add", "--before", "0", "drop", f"dsthost={SERVER}")
    try:
        assert fetch(bulkhead, "work") is None
        assert fetch(bulkhead, "personal") == PAGE.decode()
    finally:
        bulkhead.tool("qvm-firewall", "work", "reset")
    assert fetch(bulkhead, "work") == PAGE.decode()
    assert "adopted its link" in bulkhead.daemon_log()

