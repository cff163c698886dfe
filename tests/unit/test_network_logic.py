"""Networking's pure logic: addresses, the relay's frame rule, firewall rules in Qubes'
format, the netvm's configuration lines and the nftables they become."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from bulkhead import firewall
from bulkhead.guest import fwrules, netconf
from bulkhead.network import addressing, frames, manager, uplink
from bulkhead.tools.qvm_firewall import rule_from_words

MAC_A = b"\x00\x16\x3e\x5e\x6c\x05"
MAC_B = b"\xfe\xff\xff\xff\xff\xff"
IPV4 = b"\x08\x00"


# --- addresses -----------------------------------------------------------------------
def test_addresses_follow_qubes_derivation():
    assert addressing.qube_ip(5) == "10.137.0.5"
    assert addressing.qube_ip(300) == "10.137.1.44"
    assert addressing.disposable_ip(1234) == "10.138.4.210"
    assert addressing.qube_mac(10) == "00:16:3e:5e:6c:0a"
    with pytest.raises(ValueError):
        addressing.vlan_id(0)
    with pytest.raises(ValueError):
        addressing.vlan_id(4095)


# --- the relay's frame rule ------------------------------------------------------------
VNET0 = bytes(10)   # a virtio-net header with nothing to offload


def _aux(vid: int | None, tpid: int = 0x8100) -> bytes:
    """struct tpacket_auxdata as the kernel reports a frame's removed tag (or none)."""
    status = 0 if vid is None else frames.TP_STATUS_VLAN_VALID | frames.TP_STATUS_VLAN_TPID_VALID
    return frames.AUXDATA.pack(status, 0, 0, 0, 0, vid or 0, tpid if vid is not None else 0)


def test_a_client_frame_gets_its_tag_and_only_that():
    frame = MAC_B + MAC_A + IPV4 + b"payload"
    tagged = frames.tag(VNET0 + frame, 7)
    assert tagged == VNET0 + MAC_B + MAC_A + b"\x81\x00\x00\x07" + IPV4 + b"payload"
    # the kernel takes the tag off on the netvm's side and reports it
    assert frames.untag(VNET0 + frame, frames.vlan_of(_aux(7))) == (7, VNET0 + frame)


def test_a_tag_moves_the_offsets_of_an_offloaded_frame():
    # NEEDS_CSUM, TCPv4 GSO, header length 54, segment 1448, checksum at 34+16
    hdr = bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") \
        + (34).to_bytes(2, "little") + (16).to_bytes(2, "little")
    tagged = frames.tag(hdr + MAC_B + MAC_A + IPV4 + b"x" * 60, 7)
    assert tagged[:10] == bytes([1, 1]) + (58).to_bytes(2, "little") \
        + (1448).to_bytes(2, "little") + (38).to_bytes(2, "little") + (16).to_bytes(2, "little")


@pytest.mark.parametrize("ethertype", [b"\x81\x00", b"\x88\xa8", b"\x91\x00"])
def test_a_frame_a_client_tagged_itself_is_dropped(ethertype):
    assert frames.tag(VNET0 + MAC_B + MAC_A + ethertype + b"\x00\x09" + IPV4 + b"x", 7) is None
    # a tag the kernel took off (reported beside the frame) counts too
    assert frames.tag(VNET0 + MAC_B + MAC_A + IPV4 + b"x", 7, came_tagged=True) is None


def test_frames_from_the_netvm_without_a_usable_tag_are_dropped():
    frame = VNET0 + MAC_A + MAC_B + IPV4 + b"payload"
    assert frames.vlan_of(_aux(None)) == 0
    assert frames.untag(frame, frames.vlan_of(_aux(None))) is None          # untagged
    assert frames.untag(frame, frames.vlan_of(_aux(0))) is None             # VLAN 0
    assert frames.untag(frame, frames.vlan_of(_aux(7, tpid=0x88A8))) is None  # 802.1ad
    double = VNET0 + MAC_A + MAC_B + b"\x81\x00\x00\x08" + IPV4
    assert frames.untag(double, 7) is None
    assert frames.vlan_of(b"short") is None
    assert frames.tag(b"short", 1) is None and frames.untag(b"short", 1) is None


def _control(path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for _ in range(100):
        try:
            c.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)
    c.settimeout(10)
    assert c.recv(64) == b"ready"
    return c


def _read(tap: int, timeout: float) -> bytes | None:
    """What QEMU would read from a link's tap (its virtio-net header, then the frame)."""
    import select
    if not select.select([tap], [], [], timeout)[0]:
        return None
    return os.read(tap, 70000)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="links are taps: root only")


@needs_root
def test_relay_process_keeps_clients_apart(tmp_path):
    """The real relay process on real links (taps in namespaces of their own, written
    and read as QEMU does): a client's frame reaches the trunk tagged; a frame tagged
    for client 2 reaches client 2 only; untagged and unknown ones reach nobody; a second
    control connection (a restarted daemon) takes over and gets the links back."""
    import array
    import asyncio

    from bulkhead.network.link import open_links

    (trunk, trunk_relay), = asyncio.run(open_links(1))
    taps = dict(zip((1, 2), asyncio.run(open_links(2))))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "relay.sock"))
    listener.listen(2)
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead.network.relay",
                             str(listener.fileno()), str(trunk_relay.fileno())],
                            pass_fds=[listener.fileno(), trunk_relay.fileno()])
    listener.close()
    trunk_relay.close()
    try:
        control = _control(tmp_path / "relay.sock")
        clients = {}
        for vid, (tap, pkt) in taps.items():
            control.sendmsg([f"add {vid}".encode()],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [pkt.fileno()]))])
            assert control.recv(64) == b"ok"
            pkt.close()
            clients[vid] = tap
        frame = MAC_B + MAC_A + IPV4 + b"from one"
        os.write(clients[1], VNET0 + frame)
        assert _read(trunk, 2) == frames.tag(VNET0 + frame, 1)
        os.write(clients[1], VNET0 + MAC_B + MAC_A + b"\x81\x00\x00\x02" + IPV4 + b"hop")
        back = MAC_A + MAC_B + IPV4 + b"to two"
        os.write(trunk, frames.tag(VNET0 + back, 2))
        os.write(trunk, VNET0 + back)                                     # untagged
        os.write(trunk, frames.tag(VNET0 + back, 9))                      # nobody's
        assert _read(clients[2], 2) == VNET0 + back
        assert _read(clients[1], 0.5) is None
        assert _read(clients[2], 0.5) is None
        assert _read(trunk, 0.5) is None                                  # the hop: dropped
        # the daemon goes; a new one connects, lists and takes the links back
        control.close()
        os.write(clients[1], VNET0 + frame)                               # still relayed
        assert _read(trunk, 2) == frames.tag(VNET0 + frame, 1)
        control = _control(tmp_path / "relay.sock")
        control.send(b"list")
        assert control.recv(64) == b"ok 1 2"
        control.send(b"take 2")
        reply, anc, _f, _a = control.recvmsg(64, socket.CMSG_SPACE(4))
        assert reply == b"ok" and anc
        control.send(b"del 2")
        assert control.recv(64) == b"ok"
        os.write(trunk, frames.tag(VNET0 + back, 2))
        assert _read(clients[2], 0.5) is None
        control.send(b"quit")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(10)
        for fd in [trunk, *clients.values()]:
            os.close(fd)


def test_relay_exits_with_the_qemu_it_watches(tmp_path):
    import array

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "relay.sock"))
    listener.listen(2)
    trunk, trunk_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead.network.relay",
                             str(listener.fileno()), str(trunk_relay.fileno())],
                            pass_fds=[listener.fileno(), trunk_relay.fileno()])
    listener.close()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        control = _control(tmp_path / "relay.sock")
        pidfd = os.pidfd_open(sleeper.pid)
        control.sendmsg([b"watch"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [pidfd]))])
        assert control.recv(64) == b"ok"
        os.close(pidfd)
        assert proc.poll() is None
        sleeper.kill()
        sleeper.wait()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        sleeper.kill()


# --- firewall rules -----------------------------------------------------------------------
@pytest.mark.parametrize("line,canonical", [
    ("action=accept", "action=accept"),
    ("action=drop dsthost=192.168.1.7", "action=drop dst4=192.168.1.7/32"),
    ("action=drop dst4=10.1.2.3/8", "action=drop dst4=10.0.0.0/8"),
    ("action=accept dsthost=Example.COM. proto=tcp dstports=443",
     "action=accept proto=tcp dsthost=example.com dstports=443-443"),
    ("action=accept proto=icmp icmptype=8 comment=ping out, please",
     "action=accept proto=icmp icmptype=8 comment=ping out, please"),
    ("action=accept specialtarget=dns expire=1700000000",
     "action=accept specialtarget=dns expire=1700000000"),
])
def test_rules_parse_to_qubes_canonical_form(line, canonical):
    assert fwrules.format_rule(fwrules.parse_rule(line)) == canonical


@pytest.mark.parametrize("line,why", [
    ("proto=tcp", "no action"),
    ("action=allow", "accept or drop"),
    ("action=accept dstports=80", "needs proto"),
    ("action=accept proto=tcp dstports=90-80", "empty"),
    ("action=accept proto=tcp dstports=70000", "port number"),
    ("action=accept icmptype=8", "needs proto=icmp"),
    ("action=accept dsthost=bad_name!", "not an address"),
    ("action=accept dst4=300.1.1.1", "IPv4"),
    ("action=accept action=drop", "twice"),
    ("action=accept colour=red", "unknown"),
    ("action=accept specialtarget=ntp", "dns"),
    ("action=accept dsthost=a.b\tc", "printable"),
])
def test_bad_rules_are_refused_with_a_reason(line, why):
    with pytest.raises(fwrules.RuleError, match=why):
        fwrules.parse_rule(line)


def test_expiry(tmp_path):
    rules = fwrules.parse_rules("action=drop dsthost=1.2.3.4 expire=100\naction=accept\n")
    assert firewall.active(rules, 99) == rules
    assert firewall.active(rules, 100) == rules[1:]
    assert firewall.next_expiry(rules, 50) == 100
    assert firewall.next_expiry(rules, 100) is None


def test_rules_store_round_trip_and_default(tmp_path):
    assert firewall.load(tmp_path, "work") == [{"action": "accept"}]
    rules = fwrules.parse_rules("action=drop dst4=10.0.0.0/8\naction=accept\n")
    firewall.save(tmp_path, "work", rules)
    assert firewall.load(tmp_path, "work") == rules
    firewall.rules_path(tmp_path, "work").write_text("action=maybe\n")
    with pytest.raises(fwrules.RuleError):
        firewall.load(tmp_path, "work")


def test_qvm_firewall_words():
    assert fwrules.format_rule(rule_from_words(["drop", "dsthost=1.2.3.4"])) == \
        "action=drop dst4=1.2.3.4/32"
    r = rule_from_words(["accept", "expire=+60", "comment=two", "words"], now=1000)
    assert r["expire"] == "1060" and r["comment"] == "two words"


# --- what the netvm is told and does ------------------------------------------------------
def _cfg_text():
    return manager.config_text(
        trunk=("fe:ff:ff:ff:ff:ff", "10.137.0.2"),
        uplink=("00:16:3e:5f:6c:02", "192.0.2.2/24", "192.0.2.1"), dns=("192.0.2.1",),
        clients=[(3, "10.137.0.3", "00:16:3e:5e:6c:03",
                  fwrules.parse_rules("action=drop dsthost=192.0.2.9 proto=tcp dstports=80\n"
                                      "action=accept specialtarget=dns\n"
                                      "action=accept dsthost=example.org\n")),
                 (4, "10.137.0.4", "00:16:3e:5e:6c:04", None)])


def test_config_round_trip():
    cfg = netconf.parse_config(_cfg_text())
    assert cfg["trunk"] == ("fe:ff:ff:ff:ff:ff", "10.137.0.2")
    assert set(cfg["clients"]) == {3, 4}
    assert len(cfg["rules"][3]) == 3
    assert 4 in cfg["blocked"]


@pytest.mark.parametrize("text,why", [
    ("client 3 10.137.0.3 zz:16:3e:5e:6c:03\n", "MAC"),
    ("client 0 10.137.0.3 00:16:3e:5e:6c:03\n", "VLAN"),
    ("client 3 10.137.0.300 00:16:3e:5e:6c:03\n", "IPv4"),
    ("rule 3 action=accept\n", "no client"),
    ("run rm -rf /\n", "unknown"),
    ("uplink 00:16:3e:5f:6c:02 192.0.2.2 192.0.2.1\n", "PREFIX"),
])
def test_bad_config_lines_are_refused(text, why):
    with pytest.raises(netconf.ConfigError, match=why):
        netconf.parse_config(text)


def test_a_rule_that_does_not_parse_blocks_only_its_client():
    cfg = netconf.parse_config("client 3 10.137.0.3 00:16:3e:5e:6c:03\nrule 3 action=bogus\n"
                               "client 4 10.137.0.4 00:16:3e:5e:6c:04\nrule 4 action=accept\n")
    assert 3 in cfg["blocked"] and 4 not in cfg["blocked"]


def test_ruleset_renders_firewall_antispoof_nat_and_dns():
    cfg = netconf.parse_config(_cfg_text())
    resolve = {"example.org": {"203.0.113.5", "203.0.113.6"}}.get
    chains = {3: netconf.client_chain(3, cfg["rules"][3], lambda n: resolve(n) or set(), 0),
              4: ["reject with icmpx type admin-prohibited"]}
    text = netconf.render_ruleset(cfg, "eth1", chains)
    assert 'iifname "vif3" ip saddr != 10.137.0.3 drop' in text
    assert 'iifname "vif*" oifname "vif*" drop' in text
    assert 'oifname "eth1" masquerade' in text
    assert "ip daddr 10.139.1.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 192.0.2.1" in text
    fw3 = text.split("chain fw-3 {")[1].split("}\n  chain")[0]
    lines = [ln.strip() for ln in fw3.strip().splitlines()]
    assert lines[0] == ("ip daddr 192.0.2.9/32 meta l4proto tcp tcp dport 80 "
                        "reject with icmpx type admin-prohibited")
    assert lines[1].startswith("ct original ip daddr { 10.139.1.1, 10.139.1.2 }")
    assert lines[2] == "ip daddr { 203.0.113.5, 203.0.113.6 } accept"
    assert lines[-1] == "reject with icmpx type admin-prohibited"
    assert text.count("chain fw-4 {\n    reject with icmpx type admin-prohibited\n  }") == 1


def test_unresolvable_host_name_fails_closed():
    rules = fwrules.parse_rules("action=accept dsthost=nowhere.invalid\n")
    with pytest.raises(netconf.ConfigError, match="nowhere.invalid"):
        netconf.client_chain(3, rules, lambda n: set(), 0)


def test_expired_rules_are_left_out_in_the_netvm_too():
    rules = fwrules.parse_rules("action=drop dst4=1.2.3.4 expire=10\naction=accept\n")
    assert netconf.client_chain(3, rules, lambda n: set(), now=11) == \
        ["accept", "reject with icmpx type admin-prohibited"]


def test_ip_commands_make_vlans_and_static_neighbours():
    cfg = netconf.parse_config(_cfg_text())
    ifaces = {"lo": "00:00:00:00:00:00", "eth0": "fe:ff:ff:ff:ff:ff",
              "eth1": "00:16:3e:5f:6c:02", "vif9": "fe:ff:ff:ff:ff:ff"}
    cmds, upstream = netconf.ip_commands(cfg, ifaces)
    assert upstream == "eth1"
    assert "link del vif9" in cmds
    assert ("link add link eth0 name vif3 address fe:ff:ff:ff:ff:ff mtu 65520 type vlan id 3"
            in cmds)
    assert "neigh replace 10.137.0.3 lladdr 00:16:3e:5e:6c:03 dev vif3 nud permanent" in cmds
    assert "route replace default via 192.0.2.1 dev eth1" in cmds


def test_client_link_commands():
    cfg = netconf.parse_config(manager.config_text(
        link=("00:16:3e:5e:6c:05", "10.137.0.5", "10.137.0.3")))
    cmds, upstream = netconf.ip_commands(cfg, {"eth0": "00:16:3e:5e:6c:05"})
    assert upstream == "eth0"
    assert "addr add 10.137.0.5/32 dev eth0" in cmds
    assert "neigh replace 10.137.0.3 lladdr fe:ff:ff:ff:ff:ff dev eth0 nud permanent" in cmds
    assert "route replace default via 10.137.0.3 dev eth0 onlink" in cmds
    with pytest.raises(netconf.ConfigError, match="no network interface"):
        netconf.ip_commands(cfg, {"eth0": "00:16:3e:5e:6c:99"})


# --- the uplink ------------------------------------------------------------------------------
def test_uplink_features():
    assert uplink.parse({}).mode == "passt"
    assert uplink.parse({"uplink": "none"}).mode == "none"
    up = uplink.parse({"uplink": "bridge:inet0:br0", "uplink-address": "192.0.2.2/24",
                       "uplink-gateway": "192.0.2.1", "uplink-dns": "192.0.2.1 192.0.2.53"})
    assert (up.netns, up.bridge, up.dns) == ("inet0", "br0", ("192.0.2.1", "192.0.2.53"))
    for bad, why in [({"uplink": "wifi"}, "passt, none or bridge"),
                     ({"uplink": "bridge:a;b:br0"}, "NETNS"),
                     ({"uplink": "bridge:n:br0", "uplink-address": "192.0.2.2"}, "PREFIX"),
                     ({"uplink": "bridge:n:br0", "uplink-address": "192.0.2.2/24",
                       "uplink-gateway": "x"}, "uplink-gateway"),
                     ({"uplink": "bridge:n:br0", "uplink-address": "192.0.2.2/24",
                       "uplink-gateway": "192.0.2.1"}, "uplink-dns")]:
        with pytest.raises(uplink.UplinkError, match=why):
            uplink.parse(bad)
    assert len(uplink.tap_name("0123456789abcdef", 254)) <= 15


# --- DNS answers that hostname rules follow ------------------------------------------------
def _dns_answer(qname: str, records: list[tuple[str, int, int, bytes]]) -> bytes:
    """A response: records are (owner, type, ttl, rdata); owner names uncompressed."""
    def name(n: str) -> bytes:
        return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"
    msg = b"\x12\x34\x81\x80\x00\x01" + len(records).to_bytes(2, "big") + b"\0\0\0\0"
    msg += name(qname) + b"\x00\x01\x00\x01"
    for owner, rtype, ttl, rdata in records:
        msg += (name(owner) + rtype.to_bytes(2, "big") + b"\x00\x01" + ttl.to_bytes(4, "big")
                + len(rdata).to_bytes(2, "big") + rdata)
    return msg


def test_answer_addresses_follow_the_cname_chain_only():
    from bulkhead.guest import dnsproxy

    msg = _dns_answer("www.example.org", [
        ("www.example.org", 5, 300, b"\x03cdn\x03net\x00"),
        ("cdn.net", 1, 60, bytes([203, 0, 113, 7])),
        ("evil.example", 1, 9999, bytes([198, 51, 100, 1])),   # not in the chain
        ("www.example.org", 1, 0, bytes([203, 0, 113, 8])),     # TTL 0: the floor
    ])
    qname, addrs = dnsproxy.answer_addresses(msg)
    assert qname == "www.example.org"
    assert addrs == {"203.0.113.7": 60, "203.0.113.8": dnsproxy.MIN_TTL}


@pytest.mark.parametrize("cut", [5, 20, 35])
def test_truncated_or_looping_answers_are_malformed(cut):
    from bulkhead.guest import dnsproxy

    msg = _dns_answer("a.b", [("a.b", 1, 60, b"\x01\x02\x03\x04")])
    with pytest.raises(dnsproxy.Malformed):
        dnsproxy.answer_addresses(msg[:cut])
    loop = b"\x00\x01\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xc0\x0c"
    with pytest.raises(dnsproxy.Malformed):
        dnsproxy.answer_addresses(loop)


def test_hostname_rules_get_a_set_the_forwarder_fills():
    cfg = netconf.parse_config(manager.config_text(
        trunk=("fe:ff:ff:ff:ff:ff", "10.137.0.2"), dns=("192.0.2.1",),
        clients=[(3, "10.137.0.3", "00:16:3e:5e:6c:03",
                  fwrules.parse_rules("action=accept dsthost=cdn.test proto=tcp\n"))]))
    sets = {}
    chain = netconf.client_chain(3, cfg["rules"][3], lambda n: {"192.0.2.3"}, 0, sets)
    assert sets == {"h3_1": "cdn.test"}
    assert chain[:2] == ["ip daddr { 192.0.2.3 } meta l4proto tcp accept",
                         "ip daddr @h3_1 meta l4proto tcp accept"]
    text = netconf.render_ruleset(cfg, "eth1", {3: chain}, sets,
                                  [("h3_1", "192.0.2.4", 130), ("h3_1", "192.0.2.5", 100)],
                                  now=100, proxy="10.137.0.2")
    assert "set h3_1 { type ipv4_addr; flags timeout; elements = { 192.0.2.4 timeout 30s }; }" \
        in text
    assert 'ip daddr 10.139.1.1 udp dport 53 dnat ip to 10.137.0.2:5353' in text
    assert 'iifname "vif*" udp dport 5353 accept' in text


def test_tor_gateway_ruleset_and_torrc():
    from bulkhead.guest import torgw

    cfg = netconf.parse_config(manager.config_text(
        trunk=("fe:ff:ff:ff:ff:ff", "10.137.0.9"), tor="bridge 192.0.2.1:9001",
        clients=[(5, "10.137.0.5", "00:16:3e:5e:6c:05", [{"action": "accept"}])]))
    assert cfg["tor"] == "192.0.2.1:9001"
    text = torgw.render_tor_ruleset(cfg)
    assert 'iifname "vif*" meta l4proto tcp redirect to :9040' in text
    assert 'iifname "vif*" udp dport 53 redirect to :5300' in text
    forward = text.split("chain forward {")[1].split("}")[0]
    assert "policy drop" in forward and "accept" not in forward   # nothing is forwarded
    rc = torgw.torrc("10.137.0.9", "192.0.2.1:9001").splitlines()
    assert "TransPort 10.137.0.9:9040 IsolateClientAddr IsolateDestAddr" in rc
    assert "DNSPort 10.137.0.9:5300 IsolateClientAddr" in rc
    assert "UseBridges 1" in rc and "Bridge 192.0.2.1:9001" in rc
    assert "Bridge" not in torgw.torrc("10.137.0.9")
    with pytest.raises(netconf.ConfigError, match="ADDRESS:PORT"):
        netconf.parse_config("tor bridge 192.0.2.1\n")


def test_agent_takes_network_configuration_from_dom0_only():
    """A qube calling bulkhead.NetConfig in a netvm through qrexec arrives with its own
    name as the source: refused, before anything runs."""
    from bulkhead.guest import agent as agent_mod
    from bulkhead.guest import protocol as P

    agent = agent_mod.Agent("/nonexistent")
    started = []
    agent.start_call = lambda *a, **kw: started.append(a)
    agent.service_request(5, b"root\0bulkhead.NetConfig\0work")
    assert not started
    assert P.pack(P.EXIT, 5, P.i32(127)) in bytes(agent.out)
    assert b"dom0's alone" in bytes(agent.out)
    agent.service_request(6, b"root\0bulkhead.NetConfig\0dom0")
    assert started and started[0][1] == "root"
