"""A stand-in for the internet: a network namespace this test run made, with a bridge,
an HTTP server and (optionally) a DNS server, and nothing routed anywhere else.

sys-net's uplink is pointed at it with ``bridge:NETNS:BRIDGE``; no packet of a
test ever leaves the namespaces and loopback the tests made themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "192.0.2"          # TEST-NET-1: never routed on any real network
SERVER = f"{SUBNET}.1"
SYS_NET = f"{SUBNET}.2"
PAGE = b"hello from the test internet\n"


@dataclass
class Internet:
    netns: str
    bridge: str
    root: Path
    procs: list[subprocess.Popen]

    @property
    def uplink(self) -> str:
        return f"bridge:{self.netns}:{self.bridge}"

    def features(self) -> dict[str, str]:
        return {"uplink": self.uplink, "uplink-address": f"{SYS_NET}/24",
                "uplink-gateway": SERVER, "uplink-dns": SERVER}

    def ns(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=check,
                              capture_output=True, text=True, **kw)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "delete", self.netns], check=False, capture_output=True)


def make_internet(root: Path, big_mib: int = 0,
                  dns: dict[str, list[str]] | None = None) -> Internet:
    """``dns``: names the DNS server at SERVER answers, each with its addresses in turn
    (each address is also put on the bridge, where the HTTP server answers too)."""
    netns = f"bhnet{os.getpid()}"
    bridge = "br0"
    subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
    for argv in (["ip", "netns", "add", netns],
                 ["ip", "-n", netns, "link", "set", "lo", "up"],
                 ["ip", "-n", netns, "link", "add", bridge, "type", "bridge"],
                 ["ip", "-n", netns, "addr", "add", f"{SERVER}/24", "dev", bridge],
                 ["ip", "-n", netns, "link", "set", bridge, "up"]):
        subprocess.run(argv, check=True, capture_output=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_bytes(PAGE)
    if big_mib:
        with open(root / "big", "wb") as f:
            f.write(os.urandom(1024 * 1024) * big_mib)
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "http.server", "80",
         "--bind", "0.0.0.0", "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [server]
    if dns:
        for extra in {ip for ips in dns.values() for ip in ips} - {SERVER}:
            subprocess.run(["ip", "-n", netns, "addr", "add", f"{extra}/24", "dev", bridge],
                           check=True, capture_output=True)
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable,
             str(Path(__file__).with_name("dns_server.py")), SERVER,
             *(f"{name}={','.join(ips)}" for name, ips in dns.items())],
            stdout=(root / "dns.log").open("w"), stderr=subprocess.STDOUT))
    net = Internet(netns, bridge, root, procs)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = net.ns("python3", "-c", f"import urllib.request as u; u.urlopen('http://{SERVER}/', timeout=2)",
                   check=False)
        if r.returncode == 0:
            return net
        time.sleep(0.2)
    net.close()
    raise RuntimeError("the test internet's HTTP server did not come up")
