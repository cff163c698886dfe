"""The daemon as a process: durability under SIGKILL, SIGTERM, --detach, the netns."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bulkhead.config import Paths
from core_helpers import call, make_app, ok, standard_system


def _env(home: Path, netns: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BULKHEAD_HOME=str(home), BULKHEAD_SOCKET=str(home / "qubesd.sock"),
               BULKHEAD_TEST_LIFECYCLE="fake")
    if netns:
        env.pop("BULKHEAD_TEST_NO_NETNS", None)
    else:
        env["BULKHEAD_TEST_NO_NETNS"] = "1"
    return env


def _answers(sock: Path) -> bool:
    try:
        return call(sock, "dom0", "admin.vm.List").startswith(b"0\0")
    except OSError:
        return False


class Daemon:
    """``python -m bulkhead.daemon`` in the foreground, with the fake lifecycle."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket = home / "qubesd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(home / "daemon-test.log", "ab")

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bulkhead.daemon"],
                                     env=_env(self.home), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not _answers(self.socket):
            assert self.proc.poll() is None, "the daemon died at start"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(30)

    def close(self) -> None:
        self.kill()
        if self.proc is not None:
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    d = Daemon(tmp_path)
    yield d
    d.close()


def _state(sock: Path, name: str) -> dict[str, Any] | None:
    """What the daemon says about qube ``name`` (None if it does not exist); checks that
    a qube that exists is whole."""
    reply = call(sock, name, "admin.vm.property.GetAll")
    if reply.startswith(b"2\0QubesVMNotFoundError\0"):
        return None
    props = {}
    for line in ok(reply).splitlines():
        prop, default, _type, value = (line.split(" ", 3) + [""])[:4]
        props[prop] = (default == "default=True", value)
    for prop in ("name", "qid", "uuid", "label", "template"):
        assert props[prop][0] is False and props[prop][1], (name, prop, props[prop])
    assert ok(call(sock, name, "admin.vm.volume.List")) == "root\nprivate\nvolatile\nkernel\n"
    features = {f: ok(call(sock, name, "admin.vm.feature.Get", f))
                for f in ok(call(sock, name, "admin.vm.feature.List")).splitlines()}
    tags = set(ok(call(sock, name, "admin.vm.tag.List")).splitlines())
    assert "created-by-dom0" in tags
    return {"label": props["label"][1], "memory": int(props["memory"][1]),
            "features": features, "tags": tags - {"created-by-dom0"}}


def test_acknowledged_changes_survive_sigkill(daemon: Daemon) -> None:
    rng = random.Random(20240607)
    sock = daemon.socket
    daemon.start()
    assert call(sock, "dom0", "admin.vm.Create.TemplateVM", None,
                b"name=tpl label=black") == b"0\0"
    assert call(sock, "dom0", "admin.property.Set", "default_template", b"tpl") == b"0\0"
    model: dict[str, dict[str, Any]] = {}
    labels = ["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"]
    kills = acknowledged = uncertain = 0
    serial = 0

    for step in range(200):
        names = sorted(model)
        choice = rng.random()
        if not names or (choice < 0.3 and len(names) < 15):
            serial += 1
            name, label = f"q{serial}", rng.choice(labels)
            op: tuple[Any, ...] = ("create", name, label)
            request = ("dom0", "admin.vm.Create.AppVM", None,
                       f"name={name} label={label}".encode())
        elif choice < 0.45:
            name = rng.choice(names)
            op = ("remove", name)
            request = (name, "admin.vm.Remove", None, b"")
        elif choice < 0.6:
            name, value = rng.choice(names), rng.randrange(200, 4000)
            op = ("memory", name, value)
            request = (name, "admin.vm.property.Set", "memory", str(value).encode())
        elif choice < 0.75:
            name, value = rng.choice(names), rng.choice(labels)
            op = ("label", name, value)
            request = (name, "admin.vm.property.Set", "label", value.encode())
        elif choice < 0.9:
            name, key, value = rng.choice(names), f"f{rng.randrange(5)}", str(rng.randrange(99))
            op = ("feature", name, key, value)
            request = (name, "admin.vm.feature.Set", key, value.encode())
        else:
            name, tag = rng.choice(names), f"t{rng.randrange(5)}"
            op = ("tag", name, tag)
            request = (name, "admin.vm.tag.Set", tag, b"")

        kill_now = rng.random() < 0.1
        timer = None
        if kill_now:
            # SIGKILL at a random moment around the request: before, during or after it
            timer = threading.Timer(rng.uniform(0, 0.01), daemon.kill)
            timer.start()
        try:
            reply = call(sock, *request)
        except OSError:
            reply = b""
        if timer is not None:
            timer.join()
            daemon.wait()
            kills += 1

        before = model.get(op[1])
        if reply == b"0\0":
            acknowledged += 1
            _apply(model, op)
        elif reply.startswith(b"2\0"):
            raise AssertionError(f"step {step}: {op} refused: {reply!r}")
        if kill_now or not reply:
            daemon.start()
            if reply != b"0\0":
                uncertain += 1
                # Unacknowledged: either wholly done or not at all.
                actual = _state(sock, op[1])
                after = dict(model)
                _apply(after, op)
                assert actual in (_normalise(before), _normalise(after.get(op[1]))), (op, actual)
                if actual is None:
                    model.pop(op[1], None)
                else:
                    model[op[1]] = {**actual, "tags": set(actual["tags"])}
            for name in model:
                assert _state(sock, name) == _normalise(model[name]), (step, name)

    listed = {line.split(" ")[0] for line in ok(call(sock, "dom0", "admin.vm.List")).splitlines()}
    assert listed == set(model) | {"dom0", "tpl"}
    for name in model:
        assert _state(sock, name) == _normalise(model[name])
    assert kills >= 10 and acknowledged >= 150
    print(f"{kills} kills, {acknowledged} acknowledged, {uncertain} unacknowledged")


def _apply(model: dict[str, dict[str, Any]], op: tuple[Any, ...]) -> None:
    kind, name = op[0], op[1]
    if kind == "create":
        model[name] = {"label": op[2], "memory": 400, "features": {}, "tags": set()}
    elif kind == "remove":
        model.pop(name, None)
    elif kind in ("memory", "label"):
        model[name] = {**model[name], kind: op[2]}
    elif kind == "feature":
        model[name] = {**model[name], "features": {**model[name]["features"], op[2]: op[3]}}
    elif kind == "tag":
        model[name] = {**model[name], "tags": model[name]["tags"] | {op[2]}}


def _normalise(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if entry is None else {**entry, "tags": set(entry["tags"])}


def test_sigterm_leaves_cleanly_and_state_persists(daemon: Daemon) -> None:
    daemon.start()
    assert call(daemon.socket, "dom0", "admin.vm.Create.StandaloneVM", None,
                b"name=keep label=green") == b"0\0"
    assert call(daemon.socket, "keep", "admin.vm.Start") == b"0\0"
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not daemon.socket.exists()
    daemon.start()
    assert b"keep class=StandaloneVM" in call(daemon.socket, "dom0", "admin.vm.List")


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return  # exited; its reaper has not collected it yet
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


def _run_detached(home: Path, netns: bool) -> int:
    code = ("import sys; from bulkhead.config import Paths; from bulkhead.daemon import run_daemon;"
            "sys.exit(run_daemon(Paths.from_env(), detach=True))")
    started = subprocess.run([sys.executable, "-c", code], env=_env(home, netns=netns),
                             timeout=60, capture_output=True)
    assert started.returncode == 0, started.stderr.decode()
    # The parent returned only once the socket accepts connections.
    assert _answers(home / "qubesd.sock")
    return int((home / "daemon.pid").read_text())


def test_detach(tmp_path: Path) -> None:
    pid = _run_detached(tmp_path, netns=False)
    try:
        assert "daemon ready" in (tmp_path / "log" / "daemon.log").read_text()
        assert os.getsid(pid) != os.getsid(0)  # a session of its own
    finally:
        os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    assert not (tmp_path / "qubesd.sock").exists() and not (tmp_path / "daemon.pid").exists()


def _can_make_netns() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        from pyroute2 import netns
        netns.listnetns()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _can_make_netns(), reason="needs root to create network namespaces")
def test_daemon_lives_in_a_netns_with_only_lo(tmp_path: Path) -> None:
    from bulkhead.netns import interfaces, remove_netns
    paths = Paths.from_env(_env(tmp_path, netns=True))
    pid = _run_detached(tmp_path, netns=True)
    try:
        assert interfaces(pid) == ["lo"]
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert f"network namespace {paths.netns_name}" in \
            (tmp_path / "log" / "daemon.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
        remove_netns(paths.netns_name)


def test_adopts_every_qube_at_start(tmp_path: Path) -> None:
    from bulkhead.daemon import _prepare

    app = make_app()
    asyncio.run(standard_system(app))
    lifecycle = app.lifecycle
    lifecycle.calls.clear()
    asyncio.run(_prepare(app, lifecycle))
    adopted = sorted(name for op, name in lifecycle.calls if op == "adopt")
    assert adopted == sorted(vm.name for vm in app.domains if vm.name != "dom0")


def test_socket_is_not_world_accessible(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.socket.stat().st_mode & 0o777 == 0o660
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.close()


def test_detach_reports_a_daemon_that_cannot_start(daemon: Daemon) -> None:
    daemon.start()  # holds the socket: a second daemon must fail, and say so
    code = ("import sys; from bulkhead.config import Paths; from bulkhead.daemon import run_daemon;"
            "sys.exit(run_daemon(Paths.from_env(), detach=True))")
    second = subprocess.run([sys.executable, "-c", code], env=_env(daemon.home), timeout=60,
                            capture_output=True)
    assert second.returncode != 0
    assert b"the daemon did not start" in second.stderr
    assert "another daemon is listening" in (daemon.home / "log" / "daemon.log").read_text()
    assert _answers(daemon.socket)  # the first one is untouched
