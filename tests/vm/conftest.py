"""Tests against real qubes: QEMU machines under TCG, the real kernel and template.

One Bulkhead instance serves the whole session (its own ``$BULKHEAD_HOME``,
socket and network namespace), set up by ``bulkhead setup`` exactly as the
README does it, minus installing Debian packages.  Booted qubes are shared
between tests; a test that needs a fresh or a broken qube makes its own.
The kernel and template image come from the shared ``$BULKHEAD_CACHE``
(``scripts/test.sh`` builds them once per machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bulkhead.client.app import App
from bulkhead.client.connection import Connection
from bulkhead.config import Paths

BIN = Path(sys.executable).parent
CACHE = os.environ.get("BULKHEAD_CACHE", "/var/cache/bulkhead")


def _have_built_artifacts() -> bool:
    return any(Path(CACHE, "kernels").glob("*/vmlinux")) and any(
        Path(CACHE, "templates").glob("debian-12-*.qcow2"))


@dataclass
class Instance:
    home: Path
    socket: Path
    env: dict[str, str]

    @property
    def paths(self) -> Paths:
        return Paths.from_env(self.env)

    def tool(self, *argv: str, input: str | bytes | None = None, check: bool = True,
             timeout: float = 180, text: bool = True) -> subprocess.CompletedProcess:
        exe = BIN / argv[0]
        cmd = [str(exe) if exe.exists() else argv[0], *argv[1:]]
        module = f"bulkhead.tools.{argv[0].replace('-', '_')}"
        if not exe.exists() and argv[0].startswith("qvm-") and \
                (Path(__file__).parents[2] / "src" / (module.replace(".", "/") + ".py")).exists():
            # A tool newer than the shared venv's scripts: run its module (same code).
            cmd = [sys.executable, "-m", module, *argv[1:]]
        r = subprocess.run(cmd, env=self.env, input=input, capture_output=True, text=text,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def tool_argv(self, name: str) -> list[str]:
        exe = BIN / name
        return [str(exe) if exe.exists() else name]

    def run(self, qube: str, command: str, user: str | None = None, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        args = ["qvm-run", "--pass-io"] + (["-u", user] if user else []) + [qube, command]
        return self.tool(*args, input=input, check=check)

    def app(self) -> App:
        return App(Connection(str(self.socket)))

    def state(self, qube: str) -> str:
        return self.app().domains[qube].get_power_state()

    def daemon_pid(self) -> int:
        return int((self.home / "daemon.pid").read_text())

    def qemu_pid(self, qube: str) -> int:
        return int((self.paths.qube_run_dir(qube) / "qemu.pid").read_text())

    def start_daemon(self) -> None:
        r = subprocess.run([sys.executable, "-m", "bulkhead.cli", "daemon", "--detach"],
                           env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        pid = self.daemon_pid()
        os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def daemon_log(self) -> str:
        return (self.home / "log" / "daemon.log").read_text(errors="replace")

    def ensure_running(self, qube: str) -> None:
        self.tool("qvm-start", "--skip-if-running", qube)


def remove_cgroups(paths: Paths) -> None:
    """The qubes' cgroups of an instance whose QEMUs were killed behind its daemon's back."""
    from bulkhead.backend import cgroup

    hierarchy = cgroup.detect()
    if hierarchy is not None:
        hierarchy.remove_instance(paths.run.name)


def _teardown(inst: Instance) -> None:
    paths = inst.paths
    try:
        inst.kill_daemon(signal.SIGTERM)
    except (OSError, ValueError):
        pass
    # Every QEMU this instance started has its runtime directory on its command line.
    subprocess.run(["pkill", "-9", "-f", str(paths.run) + "/"], check=False)
    time.sleep(0.5)
    subprocess.run(["ip", "netns", "delete", paths.netns_name], check=False, capture_output=True)
    shutil.rmtree(paths.run, ignore_errors=True)
    remove_cgroups(paths)
    if not os.environ.get("BULKHEAD_KEEP_TEST_HOME"):
        shutil.rmtree(inst.home, ignore_errors=True)


@pytest.fixture(scope="session")
def bulkhead() -> Instance:
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (QEMU, network namespaces)")
    if not _have_built_artifacts():
        pytest.fail(f"no kernel or template image in {CACHE}: run scripts/test.sh, "
                    "which builds them (`bulkhead prepare`)")
    base = Path(os.environ.get("BULKHEAD_TEST_ROOT", "/var/tmp/bulkhead-tests"))
    inst = make_instance(base / f"home-{os.getpid()}")
    yield inst
    _teardown(inst)


def make_instance(home: Path, *setup_args: str) -> Instance:
    """A Bulkhead instance of its own in ``home``, set up as the README does it
    (``bulkhead setup --no-install`` and ``setup_args``); the caller tears it down."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    # No qube of a test may reach the host's real network: sys-net has no uplink unless
    # a test gives it a bridge into a namespace of its own, and passt is refused outright.
    env = dict(os.environ, BULKHEAD_HOME=str(home), BULKHEAD_SOCKET=str(home / "qubesd.sock"),
               BULKHEAD_CACHE=CACHE, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               BULKHEAD_NO_PASST="1")
    if "--uplink" not in setup_args:
        setup_args = (*setup_args, "--uplink", "none")
    inst = Instance(home=home, socket=home / "qubesd.sock", env=env)
    r = subprocess.run([str(BIN / "bulkhead"), "setup", "--no-install", *setup_args], env=env,
                       capture_output=True, text=True, timeout=1800)
    inst.setup_output = r.stdout  # type: ignore[attr-defined]
    inst.setup_stderr = r.stderr  # type: ignore[attr-defined]
    if r.returncode != 0:
        _teardown(inst)
        pytest.fail(f"bulkhead setup failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return inst


teardown_instance = _teardown


@pytest.fixture
def work(bulkhead: Instance) -> str:
    """The default AppVM ``work``, running (with sys-net and sys-firewall, its netvms)."""
    bulkhead.ensure_running("work")
    return "work"


@pytest.fixture(scope="module")
def scratch_qube(bulkhead: Instance, request) -> str:
    """A fresh AppVM of this test module's own, with no network (it boots alone)."""
    name = "t-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:20].replace("_", "-")
    bulkhead.tool("qvm-create", "-t", "debian-12", "-l", "green", "--prop", "netvm=", name)
    yield name
    bulkhead.tool("qvm-kill", name, check=False)
    bulkhead.tool("qvm-remove", "-f", name, check=False)
