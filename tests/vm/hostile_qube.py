"""The hostile-qube harness: a fake agent inside a real qube, driven by the tests.

:class:`HostileQube` copies ``hostile_guest.py`` into a running qube, starts
it as root there, and waits until it holds the agent's port (the real agent
is killed; init keeps restarting it, and it gets the port back on
``release``).  From then on every ``qvm-run`` to that qube is a directive to
the fake agent (see ``hostile_guest.py``), so a test replays an attack
through dom0's real paths, and measures what dom0 spends meanwhile
(:class:`DaemonMeter`).  The channels that come next (qrexec, GUI, network)
get the same attacks by adding directives.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import time
from pathlib import Path

from bulkhead.client import wire
from bulkhead.client.connection import Connection
from bulkhead.client.run import METHOD, request_frame
from bulkhead.guest import protocol as P

GUEST_SCRIPT = Path(__file__).with_name("hostile_guest.py")
GUEST_PATH = "/run/hostile-agent.py"


class HostileQube:
    """A qube whose agent port is held by the fake agent.

    ``inst`` is anything with ``env`` (the instance's environment: its
    ``$BULKHEAD_SOCKET``...): the tests' instance or a benchmark's.
    """

    def __init__(self, inst, name: str) -> None:
        self.inst = inst
        self.name = name
        self.socket = inst.env["BULKHEAD_SOCKET"]

    def qvm(self, *argv: str, input: str | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=self.inst.env, input=input, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr}")
        return r

    def seize(self) -> None:
        """Start the fake agent in the qube (starting the qube if needed)."""
        self.qvm("qvm-start", "--skip-if-running", self.name, timeout=300)
        if self.is_seized():
            return
        self.qvm("qvm-run", "-p", "-u", "root", self.name, f"cat > {GUEST_PATH}",
                 input=GUEST_SCRIPT.read_text())
        self.qvm("qvm-run", "-p", "-u", "root", self.name,
                 f"setsid python3 -IS {GUEST_PATH} 1 </dev/null >/run/hostile-agent.log 2>&1 &")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.is_seized():
                return
            time.sleep(0.5)
        raise AssertionError(f"the fake agent did not take {self.name}'s port")

    def is_seized(self) -> bool:
        r = self.qvm("qvm-run", "-p", self.name, "echo seized", check=False, timeout=60)
        return r.stdout == "fake:seized\n"

    def do(self, directive: str) -> None:
        """Have the fake agent carry out ``directive`` (it answers first, then acts)."""
        r = self.qvm("qvm-run", "-p", self.name, directive, timeout=60)
        assert r.stdout == "ok\n", r.stdout

    def open_call(self, command: str, stdin: bytes = b"") -> socket.socket:
        """A ``bulkhead.vm.Run`` call as a client that never reads its output:
        the raw socket, after sending the request and ``stdin`` (without waiting)."""
        sock = Connection(self.socket).open_stream(
            wire.encode_header(METHOD, self.name, plus=False), request_frame(command, "user", False))
        if stdin:
            sock.setblocking(False)
            data = b"".join(P.pack(P.STDIN, 1, stdin[i:i + P.MAX_PAYLOAD])
                            for i in range(0, len(stdin), P.MAX_PAYLOAD))
            try:
                while data:
                    data = data[sock.send(data):]
            except BlockingIOError:
                pass  # the daemon stopped taking it: that is the point
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused: the daemon's error reply waits in the socket
        return sock


class DaemonMeter:
    """What the daemon spends: resident memory, log size, open files; and how fast
    it serves another qube meanwhile."""

    def __init__(self, inst) -> None:
        self.env = inst.env
        home = Path(inst.env["BULKHEAD_HOME"])
        self.pid = int((home / "daemon.pid").read_text())
        self.log = home / "log" / "daemon.log"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log_bytes(self) -> int:
        """Bytes in the daemon's log, the rotated files included."""
        return sum(p.stat().st_size for p in self.log.parent.glob("daemon.log*"))

    def open_files(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def round_trips(self, qube: str, runs: int = 5) -> list[float]:
        """Wall times of ``qvm-run -p QUBE true``, in seconds."""
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            r = subprocess.run(["qvm-run", "-p", qube, "true"], env=self.env, capture_output=True,
                               text=True, timeout=60)
            times.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
        return times

    def round_trip(self, qube: str, runs: int = 5) -> float:
        """Median wall time of ``qvm-run -p QUBE true``, in seconds."""
        return statistics.median(self.round_trips(qube, runs))

    def qvm_ls_answers(self) -> None:
        r = subprocess.run(["qvm-ls", "--raw-list"], env=self.env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and "work" in r.stdout.split(), (r.returncode, r.stderr)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")
