"""The daemon: Bulkhead's qubesd.

:func:`run_daemon` (called by ``bulkhead daemon [--detach]``):

1. enters dom0's network namespace (only ``lo``), before anything else;
2. loads the store and rebuilds the app (on a new system: dom0 and the
   default pool);
3. makes the lifecycle with the factory it is given (default:
   ``bulkhead.lifecycle.QemuLifecycle(app, paths)``), and calls
   ``lifecycle.adopt(vm)`` for every qube, re-attaching to machines a
   previous daemon left running;
4. serves the Admin API on ``paths.socket`` (a stale socket is replaced; the
   socket is mode 0660);
5. on SIGTERM (or SIGINT): stops serving and exits 0, leaving the machines
   running (the next daemon adopts them).

With ``detach`` it forks (twice, in a new session); the daemon logs to
``paths.log_dir/daemon.log`` and writes ``paths.pidfile``; the caller
returns only once the socket accepts connections (or raises if the daemon
failed to get there).

Test hooks, read from the environment: ``BULKHEAD_TEST_LIFECYCLE=fake`` runs
the in-memory :class:`bulkhead.lifecycle_fake.FakeLifecycle` with fake
pools (no QEMU, no disks); ``BULKHEAD_TEST_NO_NETNS=1`` stays in the
caller's network namespace (for unprivileged test runs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from .config import Paths

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .lifecycle_api import Lifecycle

log = logging.getLogger("bulkhead.daemon")

LifecycleFactory = Callable[["App", Paths], "Lifecycle"]

_READY = b"R"


def qemu_lifecycle(app: "App", paths: Paths) -> "Lifecycle":
    from .lifecycle import QemuLifecycle  # written by the backend side; imported lazily

    return QemuLifecycle(app, paths)


def _test_hooks() -> tuple[LifecycleFactory | None, Any]:
    """The fake lifecycle and pool factory, if BULKHEAD_TEST_LIFECYCLE asks for them."""
    choice = os.environ.get("BULKHEAD_TEST_LIFECYCLE", "")
    if not choice:
        return None, None
    if choice != "fake":
        raise SystemExit(f"BULKHEAD_TEST_LIFECYCLE={choice!r}: only 'fake' is known")
    from .lifecycle_fake import FakeLifecycle, fake_pool_factory

    return FakeLifecycle, fake_pool_factory


def run_daemon(paths: Paths, detach: bool = False, *,
               lifecycle_factory: LifecycleFactory | None = None,
               netns: bool | None = None) -> int:
    """Run the daemon; returns its exit status (with ``detach``: 0 in the parent once the
    child serves)."""
    if netns is None:
        netns = os.environ.get("BULKHEAD_TEST_NO_NETNS", "") not in ("1", "yes", "true")
    if not detach:
        return _run(paths, lifecycle_factory, netns, ready_fd=None, log_to_file=False)

    # Fork twice: the daemon is not our child (nothing for the caller to reap) and,
    # after setsid, leads no session that could acquire a terminal.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:  # the daemon
                code = _run(paths, lifecycle_factory, netns, ready_fd=write_fd,
                            log_to_file=True)
            else:
                code = 0
        except BaseException:  # noqa: BLE001 - a child must never return into the caller
            logging.getLogger("bulkhead.daemon").exception("daemon failed")
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)  # the intermediate child exits at once
    with os.fdopen(read_fd, "rb") as ready:
        answer = ready.read(1)  # EOF (b"") if the daemon died before serving
    if answer != _READY:
        raise RuntimeError(f"the daemon did not start; see {paths.log_dir / 'daemon.log'}")
    return 0


def _run(paths: Paths, lifecycle_factory: LifecycleFactory | None, netns: bool,
         ready_fd: int | None, log_to_file: bool) -> int:
    # Before anything else (and before any thread exists): leave the host's network.
    found: list[str] | None = None
    if netns:
        from .netns import enter_dom0_netns

        found = enter_dom0_netns(paths.netns_name)
    _setup_logging(paths, log_to_file)
    _raise_open_files()
    if found is not None:
        log.info("in network namespace %s, interfaces: %s", paths.netns_name, " ".join(found))
    if ready_fd is not None:
        _detach_stdio()
    try:
        return asyncio.run(_serve(paths, lifecycle_factory, ready_fd, pidfile=log_to_file))
    finally:
        if ready_fd is not None:
            try:
                os.close(ready_fd)
            except OSError:
                pass


#: the daemon's log rotates at this size, keeping LOG_BACKUPS earlier files: whatever
#: qubes do (their lines are rate-limited too: bulkhead.ratelimit), dom0's disk is safe
LOG_MAX_BYTES = 16 * 1024 * 1024
LOG_BACKUPS = 3
#: open files the daemon may hold: Admin API connections, QMP, agent and console sockets
OPEN_FILES = 8192


def _setup_logging(paths: Paths, to_file: bool) -> None:
    handler: logging.Handler
    if to_file:
        from logging.handlers import RotatingFileHandler

        paths.log_dir.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(paths.log_dir / "daemon.log", maxBytes=LOG_MAX_BYTES,
                                      backupCount=LOG_BACKUPS)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _raise_open_files() -> None:
    """The default soft limit (1024) is below what max_connections plus every
    qube's sockets can need; raise it towards the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit to %d: %s", want, e)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


async def _serve(paths: Paths, lifecycle_factory: LifecycleFactory | None,
                 ready_fd: int | None, pidfile: bool) -> int:
    from .api import AdminServer, load_methods
    from .app import App
    from .store import Store

    fake_lifecycle, fake_pools = _test_hooks()
    factory = lifecycle_factory or fake_lifecycle or qemu_lifecycle

    load_methods()
    paths.home.mkdir(parents=True, exist_ok=True)
    store = Store(paths.store)
    app = App(paths, pool_factory=fake_pools)
    store.load(app)
    app.initialize()
    lifecycle = factory(app, paths)
    app.set_lifecycle(lifecycle)
    app.qrexec = _qrexec_router(app, paths)
    from .disposable import Preloader

    app.preloader = Preloader(app)
    log.info("lifecycle: %s", lifecycle.describe())
    await _prepare(app, lifecycle)

    server = AdminServer(app, paths.socket)
    app.admin_server = server   # qrexec serves the admin.* calls its policy allows to qubes
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if pidfile:
        _write_pidfile(paths)
    # Serving already (a client sees them Transient), but "ready" only once they run.
    await _autostart(app)
    app.preloader.start()   # after autostart: preloads wait for the netvms
    if ready_fd is not None:
        os.write(ready_fd, _READY)
    log.info("daemon ready (pid %d)", os.getpid())
    try:
        await stop.wait()
        log.info("stopping: the qubes keep running and are adopted at the next start")
    finally:
        await server.close()
        close = getattr(lifecycle, "close", None)
        if close is not None:   # background storage work (merges) stops; qubes run on
            await close()
        store.close()
        if pidfile:
            _remove_pidfile(paths)
    return 0


def _qrexec_router(app: "App", paths: Paths) -> Any:
    """The router of the qrexec calls qubes make, under the policy in ``$BULKHEAD_HOME/policy.d``
    (the same engine the Admin API's admin.policy.* methods reload)."""
    from .qrexec.policy import engine_for
    from .qrexec.router import Router

    return Router(app, engine_for(app))


async def _prepare(app: "App", lifecycle: "Lifecycle") -> None:
    """Make the pools' directories and adopt the machines left running."""
    for name in app.pools.keys():
        try:
            await app.pools[name].setup()
        except Exception:  # noqa: BLE001 - a broken pool must not keep the others down
            log.exception("setting up pool %s failed", name)
    for vm in list(app.iter_qubes()):
        try:
            if await lifecycle.adopt(vm):
                log.info("adopted running qube %s", vm.name)
        except Exception:  # noqa: BLE001 - one qube must not keep the daemon down
            log.exception("adopting %s failed", vm.name)
    from .disposable import clean_up_leftovers

    await clean_up_leftovers(app)


async def _autostart(app: "App") -> None:
    """Start the halted qubes with ``autostart=True``, side by side (Qubes starts
    sys-net and sys-firewall so at boot); one failing does not hold the others."""
    qubes = [vm for vm in app.iter_qubes()
             if getattr(vm, "autostart", False) and vm.klass != "AdminVM" and vm.is_halted()]
    if not qubes:
        return
    log.info("autostart: %s", " ".join(vm.name for vm in qubes))
    results = await asyncio.gather(*(vm.start() for vm in qubes), return_exceptions=True)
    for vm, r in zip(qubes, results):
        if isinstance(r, BaseException):
            log.error("autostart of %s failed: %s", vm.name, r)


def _write_pidfile(paths: Paths) -> None:
    tmp = paths.pidfile.with_name(paths.pidfile.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, paths.pidfile)


def _remove_pidfile(paths: Paths) -> None:
    try:
        if paths.pidfile.read_text().strip() == str(os.getpid()):
            paths.pidfile.unlink()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulkhead daemon",
                                     description="Run the Bulkhead daemon (dom0's qubesd).")
    parser.add_argument("--detach", action="store_true",
                        help="fork into the background once the socket accepts connections")
    args = parser.parse_args(argv)
    return run_daemon(Paths.from_env(), detach=args.detach)


if __name__ == "__main__":
    sys.exit(main())
