"""dom0 has no network: the daemon lives in a network namespace with only ``lo``.

In Qubes, dom0 has no network card at all.  Bulkhead's dom0 is a process on
a host that has one, so the daemon moves itself, before doing anything else,
into a named network namespace (``ip netns`` style, ``paths.netns_name``)
that holds only the loopback interface.  Every QEMU it starts inherits that
namespace; the links between qubes are made inside it, and only sys-net's
uplink is given the host's network.

``setns`` changes the namespace of the calling *thread*: call
:func:`enter_dom0_netns` before any thread exists (threads made later
inherit it).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("bulkhead.netns")


def interfaces(pid: int | str = "self") -> list[str]:
    """The interface names in the network namespace of process ``pid``."""
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        lines = f.read().splitlines()[2:]  # two header lines
    return [line.split(":", 1)[0].strip() for line in lines if ":" in line]


def enter_dom0_netns(name: str) -> list[str]:
    """Move this process into netns ``name``, creating it (with only ``lo``) if missing,
    and bring ``lo`` up; returns the interfaces found there."""
    from pyroute2 import IPRoute, netns  # imported here: only the daemon needs them

    netns.setns(name, flags=os.O_CREAT)
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="lo"):
            ipr.link("set", index=index, state="up")
    return interfaces()


def remove_netns(name: str) -> None:
    """Remove the name of netns ``name`` (processes still in it keep it alive)."""
    from pyroute2 import netns

    if name in netns.listnetns():
        netns.remove(name)
