"""Qubes' addresses, derived from a qube's numbers as Qubes derives them.

- an AppVM (any qube but a disposable made on demand) is ``10.137.X.Y`` from its
  qid, a disposable ``10.138.X.Y`` from its dispid;
- each qube sees its netvm's address as its gateway, with a /32 of its own
  (``visible_netmask`` 255.255.255.255): nothing is "on the same subnet", every
  packet goes through the netvm;
- the virtual DNS servers ``10.139.1.1`` and ``10.139.1.2``, which each netvm
  redirects to its own upstream;
- MAC ``00:16:3e:5e:6c:QQ`` for a qube's own interface (Xen's prefix, as Qubes),
  and ``fe:ff:ff:ff:ff:ff`` for every netvm-side interface (Qubes' fixed gateway
  MAC: both ends know each other's MAC statically, no ARP between qubes).

Only dom0's numbers go in here, never anything a qube said.
"""

from __future__ import annotations

DNS_SERVERS = ("10.139.1.1", "10.139.1.2")
NETMASK = "255.255.255.255"
GATEWAY_MAC = "fe:ff:ff:ff:ff:ff"
#: MTU of every link between qubes: measured 17.6 MiB/s at 65520 vs 6.6 at 1500 on the
#: former datagram links (no offloads); with tap links TSO makes 64 KiB segments anyway
LINK_MTU = 65520
#: VLAN ids are the clients' qids (1..254): unique within an instance, never 0 or 4095
MAX_VID = 254


def _quad(prefix: str, number: int) -> str:
    if not 0 < number < 65536:
        raise ValueError(f"number {number} out of range for an address")
    return f"{prefix}.{(number >> 8) & 0xFF}.{number & 0xFF}"


def qube_ip(qid: int) -> str:
    """An AppVM's (or netvm's, template's...) address: ``10.137.X.Y`` from its qid."""
    return _quad("10.137", qid)


def disposable_ip(dispid: int) -> str:
    """A disposable made on demand: ``10.138.X.Y`` from its dispid."""
    return _quad("10.138", dispid)


def qube_mac(qid: int) -> str:
    if not 0 < qid <= MAX_VID:
        raise ValueError(f"qid {qid} out of range for a MAC")
    return f"00:16:3e:5e:6c:{qid:02x}"


def vlan_id(qid: int) -> int:
    """The VLAN a client's frames travel on towards its netvm: its qid."""
    if not 0 < qid <= MAX_VID:
        raise ValueError(f"qid {qid} out of range for a VLAN id")
    return qid


def ip_of(vm: object) -> str | None:
    """The address a qube has when it has a network (a netvm, or it provides network)."""
    qid = int(getattr(vm, "qid", 0))
    dispid = int(getattr(vm, "dispid", 0) or 0)
    if dispid:
        return disposable_ip(dispid)
    if qid <= 0:
        return None
    return qube_ip(qid)
