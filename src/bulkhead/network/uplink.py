"""sys-net's uplink: the one thing that touches a network outside dom0's empty namespace.

The feature ``uplink`` of a netvm with no netvm of its own chooses it:

- ``none``: no uplink device;
- ``bridge:NETNS:BRIDGE``: a tap device made inside the existing network
  namespace NETNS (``/run/netns/NETNS``) and enslaved to its existing bridge
  BRIDGE; sys-net's side is static, from the features ``uplink-address``
  (CIDR), ``uplink-gateway`` and ``uplink-dns`` (one or two addresses);
- ``passt`` (the default): Debian's ``passt``, run in the host's own network
  namespace (PID 1's), joined to QEMU by a stream socket pair; it gives the
  qube the host's network with no privileges and no device on the host.

The daemon itself never enters another namespace: a short-lived helper
process (``python -m bulkhead.network.uplink``) does, makes the tap and sends
its descriptor back over a socket pair (SCM_RIGHTS); the tap lives as long as
a descriptor of it is open, so it goes with sys-net's QEMU.
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
_NETNS_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class UplinkError(ValueError):
    pass


@dataclass(frozen=True)
class Uplink:
    mode: str                 # "none", "bridge", "passt"
    netns: str = ""
    bridge: str = ""
    address: str = ""         # CIDR (bridge)
    gateway: str = ""
    dns: tuple[str, ...] = ()


def _ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)


def check_mode(mode: str) -> None:
    """Just the ``uplink`` value (for ``bulkhead setup --uplink``); raises UplinkError."""
    if mode in ("passt", "none"):
        return
    parts = mode.split(":")
    if len(parts) != 3 or parts[0] != "bridge" or not _NETNS_RE.match(parts[1]) \
            or not _NAME_RE.match(parts[2]):
        raise UplinkError(f"{mode!r}: expected passt, none or bridge:NETNS:BRIDGE")


def parse(features: dict[str, str]) -> Uplink:
    """The uplink a netvm's features ask for; raises UplinkError naming what is wrong."""
    mode = features.get("uplink", "passt") or "passt"
    if mode in ("none", "passt"):
        return Uplink(mode)
    if not mode.startswith("bridge:"):
        raise UplinkError(f"feature uplink={mode!r}: expected passt, none or bridge:NETNS:BRIDGE")
    parts = mode.split(":")
    if len(parts) != 3 or not _NETNS_RE.match(parts[1]) or not _NAME_RE.match(parts[2]):
        raise UplinkError(f"feature uplink={mode!r}: expected bridge:NETNS:BRIDGE with a "
                          "namespace name and an interface name")
    address = features.get("uplink-address", "")
    addr, slash, plen = address.partition("/")
    if not slash or not _ipv4(addr) or not plen.isdigit() or not 0 < int(plen) < 32:
        raise UplinkError(f"feature uplink-address={address!r}: expected ADDRESS/PREFIX "
                          "like 192.0.2.2/24 for a bridge uplink")
    gateway = features.get("uplink-gateway", "")
    if not _ipv4(gateway):
        raise UplinkError(f"feature uplink-gateway={gateway!r}: expected an IPv4 address")
    dns = tuple(features.get("uplink-dns", "").split())
    if not 0 < len(dns) <= 2 or not all(_ipv4(a) for a in dns):
        raise UplinkError(f"feature uplink-dns={features.get('uplink-dns', '')!r}: expected "
                          "one or two IPv4 addresses")
    return Uplink("bridge", parts[1], parts[2], address, gateway, dns)


def tap_name(instance: str, qid: int) -> str:
    """A tap name unique per instance and qube (IFNAMSIZ: 15 characters)."""
    return f"bh{instance[:8]}q{qid}"[:15]


# --- the helper (runs as its own process) ------------------------------------------------
def _send_fd(sock: socket.socket, fd: int, msg: bytes) -> None:
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def make_tap(netns: str, bridge: str, name: str) -> int:
    """In the helper (already inside ``netns``: ``ip netns exec`` ran it there, with that
    namespace's /sys): make tap ``name`` on ``bridge``; returns its descriptor."""
    if not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
        raise UplinkError(f"namespace {netns} has no bridge {bridge}")
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(tun, TUNSETIFF, ifr)
    for argv in (["ip", "link", "set", name, "master", bridge], ["ip", "link", "set", name, "up"]):
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise UplinkError(f"{' '.join(argv)} in {netns}: {r.stderr.strip()}")
    return tun


def helper_main(argv: list[str]) -> int:
    """``bridge NETNS BRIDGE TAPNAME SOCKFD``: send the tap's descriptor on SOCKFD."""
    if len(argv) != 5 or argv[0] != "bridge" or not argv[4].isdigit():
        sys.stderr.write("usage: python -m bulkhead.network.uplink bridge NETNS BRIDGE TAP FD\n")
        return 2
    sock = socket.socket(fileno=int(argv[4]))
    try:
        if not (_NETNS_RE.match(argv[1]) and _NAME_RE.match(argv[2]) and _NAME_RE.match(argv[3])):
            raise UplinkError("bad namespace, bridge or tap name")
        tun = make_tap(argv[1], argv[2], argv[3])
    except (OSError, UplinkError) as e:
        sock.send(f"error: {e}".encode()[:500])
        return 1
    _send_fd(sock, tun, b"ok")
    return 0


# --- the daemon's side --------------------------------------------------------------------
async def open_bridge_tap(uplink: Uplink, name: str) -> int:
    """Run the helper; returns the tap's descriptor (the caller closes it)."""
    from .fdhelper import run_for_fds

    fds = await run_for_fds(["ip", "netns", "exec", uplink.netns], "bulkhead.network.uplink",
                            ["bridge", uplink.netns, uplink.bridge, name], 1,
                            "uplink helper", UplinkError)
    return fds[0]


async def start_passt(name: str) -> tuple[int, "object"]:
    """passt in the host's namespace, joined to a stream socket pair; (QEMU's end, process).

    Never used by tests or benchmarks on shared machines (they use ``none`` or a bridge
    into a namespace of their own)."""
    import asyncio
    import shutil

    if os.environ.get("BULKHEAD_NO_PASST", "") in ("1", "yes", "true"):
        # Tests and benchmarks on shared machines: no packet may reach the real network.
        raise UplinkError("uplink passt refused: BULKHEAD_NO_PASST is set in the daemon's "
                          "environment (use uplink none or bridge:NETNS:BRIDGE)")
    passt = shutil.which("passt")
    if passt is None:
        raise UplinkError("uplink passt: the passt program is not installed (apt install passt)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # nsenter into PID 1's network namespace: the host's, which dom0 left.
    proc = await asyncio.create_subprocess_exec(
        "nsenter", "--net=/proc/1/ns/net", "--", passt, "--foreground", "--quiet",
        "--fd", str(theirs.fileno()), pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    theirs.close()
    fd = os.dup(ours.fileno())
    ours.close()
    return fd, proc


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
