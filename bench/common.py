"""Shared by the benchmarks: a throwaway Bulkhead instance of their own.

Each benchmark runs ``bulkhead setup --no-install`` into its own
``$BULKHEAD_HOME`` (the kernel and template come from the shared cache,
``$BULKHEAD_CACHE``, default /var/cache/bulkhead) and tears it down at the end,
so it measures the real daemon, client and qubes, and leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bulkhead.client.app import App
from bulkhead.client.connection import Connection
from bulkhead.config import Paths

BIN = Path(sys.executable).parent


class BenchInstance:
    def __init__(self, name: str, default_qubes: bool = False,
                 env: dict[str, str] | None = None) -> None:
        """``env``: more environment for this instance's daemon (``BULKHEAD_JAIL=0``...)."""
        self.home = Path(os.environ.get("BULKHEAD_BENCH_ROOT", "/var/tmp/bulkhead-bench")) / name
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        self.env = dict(os.environ, BULKHEAD_HOME=str(self.home),
                        BULKHEAD_SOCKET=str(self.home / "qubesd.sock"),
                        BULKHEAD_CACHE=os.environ.get("BULKHEAD_CACHE", "/var/cache/bulkhead"),
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}", BULKHEAD_NO_PASST="1",
                        **(env or {}))
        self.paths = Paths.from_env(self.env)
        # Never the host's network from a benchmark: sys-net has no uplink unless one
        # is given (a bridge into a namespace the benchmark made).
        argv = [str(BIN / "bulkhead"), "setup", "--no-install", "--uplink", "none"]
        if not default_qubes:
            argv.append("--no-default-qubes")
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            self.close()
            sys.exit(f"bulkhead setup failed:\n{r.stdout}\n{r.stderr}")

    def app(self) -> App:
        return App(Connection(self.env["BULKHEAD_SOCKET"]))

    def tool(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=self.env,
                              capture_output=True, text=True, check=True)

    def close(self) -> None:
        try:
            pid = int((self.home / "daemon.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
        except (OSError, ValueError):
            pass
        subprocess.run(["pkill", "-9", "-f", str(self.paths.run) + "/"], check=False)
        time.sleep(0.3)
        subprocess.run(["ip", "netns", "delete", self.paths.netns_name], check=False,
                       capture_output=True)
        shutil.rmtree(self.paths.run, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)
        from bulkhead.backend import cgroup   # the qubes' cgroups, killed behind the daemon
        hierarchy = cgroup.detect()
        if hierarchy is not None:
            hierarchy.remove_instance(self.paths.run.name)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def spread(values: list[float]) -> str:
    vs = sorted(values)
    return f"min {vs[0]*1000:.0f} / median {statistics.median(vs)*1000:.0f} / max {vs[-1]*1000:.0f} ms"
