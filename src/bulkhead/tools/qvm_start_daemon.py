"""qvm-start-daemon: the GUI of every running qube on the user's display (Qubes' name).

Run in the user's desktop session, as that user (a member of group ``qubes``,
whose Admin API socket is ``root:qubes 0660``).  It starts one GUI daemon
(:mod:`bulkhead.gui.guid`, Qubes' ``qubes-guid``) per running qube whose
``gui`` feature is set, and with ``--watch`` (the default when no qube is
named) follows ``admin.Events``: a ``domain-start`` starts one, a
``domain-shutdown`` ends it (its windows go with it).  A GUI daemon that
closed its qube's connection for a protocol violation is not restarted until
the qube starts again.  It also answers qrexec's ``ask`` with a dialog on the
display (``qrexec-ask`` events; ``--no-ask`` leaves them to other answerers).

Each GUI daemon logs to ``LOG_DIR/guid.QUBE.log`` (default
``~/.local/state/bulkhead``), as Qubes' ``/var/log/qubes/guid.QUBE.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from ..client import App
from ..client.connection import Connection

log = logging.getLogger("qvm-start-daemon")


def default_log_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bulkhead"


class Supervisor:
    def __init__(self, app: App, log_dir: Path, guid_args: list[str], only: set[str] | None) -> None:
        self.app = app
        self.log_dir = log_dir
        self.guid_args = guid_args
        self.only = only
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()

    def wants_gui(self, name: str) -> bool:
        if name == "dom0" or (self.only is not None and name not in self.only):
            return False
        try:
            value = self.app.domains[name].features.get("gui", "")
        except Exception:  # noqa: BLE001 -- gone meanwhile
            return False
        return str(value) not in ("", "0", "False")

    def start(self, name: str) -> None:
        with self.lock:
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                return
            if not self.wants_gui(name):
                return
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"guid.{name}.log", "ab")
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "bulkhead.gui.guid", name, *self.guid_args],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
            out.close()
            log.info("GUI daemon for %s started (pid %d)", name, self.children[name].pid)

    def stop(self, name: str) -> None:
        with self.lock:
            child = self.children.pop(name, None)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()

    def start_running(self) -> None:
        for line in self.app.call("dom0", "admin.vm.List").decode().splitlines():
            parts = line.split()
            if parts and "state=Running" in parts:
                self.start(parts[0])

    def reap(self) -> None:
        with self.lock:
            for name, child in list(self.children.items()):
                code = child.poll()
                if code is not None:
                    log.info("GUI daemon for %s exited with status %d", name, code)
                    del self.children[name]

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)


def answer_ask(app: App, qid: str) -> None:
    """qrexec's ``ask`` as a dialog on the user's display; no answer within its time denies."""
    from ..gui.validate import sanitize_title  # noqa: PLC0415
    for line in app.call("dom0", "bulkhead.qrexec.AskList").decode().splitlines():
        parts = line.split()
        if not parts or parts[0] != qid:
            continue
        source, target, service = parts[1], parts[2], parts[3]
        fields = dict(p.split("=", 1) for p in parts[4:] if "=" in p)
        targets = [t for t in fields.get("targets", "").split(",") if t]
        default = fields.get("default") or (targets[0] if targets else target)
        choices = [default] + [t for t in targets if t != default]
        clean = [sanitize_title(c.encode()) for c in choices]
        r = subprocess.run(
            [sys.executable, "-m", "bulkhead.gui.dialog", "--title", "Bulkhead: qrexec call",
             f"{sanitize_title(source.encode())} asks to call {sanitize_title(service.encode())}",
             "Enter: allow to the chosen qube    Escape: deny",
             *sum((["--choice", c] for c in clean), [])],
            capture_output=True, text=True, check=False)
        chosen = r.stdout.strip()
        answer = f"allow {chosen}" if r.returncode == 0 and chosen in choices else "deny"
        try:
            app.call("dom0", "bulkhead.qrexec.AskAnswer", qid, answer.encode())
        except Exception as e:  # noqa: BLE001 -- answered elsewhere, or timed out
            log.info("qrexec ask %s: %s", qid, e)
        return


def main(args: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qvm-start-daemon", description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every running qube with the gui feature")
    ap.add_argument("--watch", action="store_true", help="follow qubes starting and stopping")
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--confirm-paste", action="store_true",
                    help="ask before each paste (source, target, size, a preview)")
    ap.add_argument("--clipboard-dir", default=None)
    ap.add_argument("--no-ask", action="store_true", help="do not answer qrexec's ask")
    ap.add_argument("qubes", nargs="*")
    opts = ap.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s qvm-start-daemon: %(message)s")
    if not os.environ.get("DISPLAY"):
        print("qvm-start-daemon: no DISPLAY: run it in your desktop session", file=sys.stderr)
        return 1
    watch = opts.watch or not opts.qubes
    app = App(Connection())
    guid_args = (["--confirm-paste"] if opts.confirm_paste else []) + \
        (["--clipboard-dir", opts.clipboard_dir] if opts.clipboard_dir else [])
    sup = Supervisor(app, opts.log_dir or default_log_dir(), guid_args,
                     set(opts.qubes) if opts.qubes and not opts.all else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stream = Connection().events("dom0") if watch else None
        sup.start_running()
        if stream is None:
            while sup.children:
                time.sleep(0.5)
                sup.reap()
            return 0
        with stream:
            while True:
                ev = stream.next(timeout=1.0)
                sup.reap()
                if ev is None:
                    continue
                if ev.name == "domain-start" and ev.subject:
                    sup.start(ev.subject)
                elif ev.name == "domain-shutdown" and ev.subject:
                    sup.stop(ev.subject)
                elif ev.name == "qrexec-ask" and not opts.no_ask and "id" in ev.kwargs:
                    threading.Thread(target=answer_ask, args=(app, ev.kwargs["id"]),
                                     daemon=True).start()
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        sup.stop_all()


if __name__ == "__main__":
    sys.exit(main())
