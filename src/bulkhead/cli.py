"""The ``bulkhead`` command: what Qubes does at install time, and the daemon.

    bulkhead setup [--no-install] [--no-default-qubes] [--uplink MODE]
                                                         set everything up, start the daemon, qvm-ls
    bulkhead prepare [--no-install]                      packages, kernel, template image only
    bulkhead daemon [--detach]                           the admin daemon (Qubes' qubesd)
    bulkhead info                                        acceleration, kernel, template, daemon
    bulkhead template build debian-12                    rebuild the template image and import it
    bulkhead policy why SERVICE[+ARG] SOURCE TARGET      the qrexec decision and the line that made it
    bulkhead policy log [-n N]                           the end of the qrexec audit log
"""

from __future__ import annotations

import argparse
import sys

from .config import Paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bulkhead", description="Bulkhead: Qubes OS's design on QEMU.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="install, build and start everything; ends with qvm-ls")
    s.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    s.add_argument("--no-default-qubes", action="store_true", help="create only the template")
    s.add_argument("--uplink", default="passt", metavar="MODE",
                   help="sys-net's uplink for a new install: passt (default: the host's "
                        "network), none, or bridge:NETNS:BRIDGE")
    s = sub.add_parser("prepare", help="host packages, qube kernel and template image only")
    s.add_argument("--no-install", action="store_true")
    s = sub.add_parser("daemon", help="run the admin daemon")
    s.add_argument("--detach", action="store_true", help="run in the background (pidfile, log file)")
    sub.add_parser("info", help="what this host runs qubes with")
    s = sub.add_parser("template", help="template images")
    tsub = s.add_subparsers(dest="template_command", required=True)
    b = tsub.add_parser("build", help="rebuild a template's image and import it as a new root revision")
    b.add_argument("name", choices=["debian-12"])
    s = sub.add_parser("boot-state", help="a qube's saved boot state: ready, building, missing or off")
    s.add_argument("qube")
    s.add_argument("--build", action="store_true", help="build it now if it is missing, and wait")
    # listed for --help; main() hands "policy ..." to bulkhead.qrexec.policy_cli
    sub.add_parser("policy", help="the qrexec policy: why, log, lint")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["policy"]:  # its own parser (a REMAINDER argument would not take --help)
        from .qrexec.policy_cli import main as policy_main
        return policy_main(argv[1:])
    args = _parser().parse_args(argv)
    paths = Paths.from_env()
    from .errors import QubesException
    from .setup.progress import SetupError, console
    try:
        if args.command == "setup":
            from .setup.run import run_setup
            return run_setup(paths, install_packages=not args.no_install,
                             default_qubes=not args.no_default_qubes, uplink=args.uplink)
        if args.command == "prepare":
            from .setup.run import prepare
            prepare(paths, install_packages=not args.no_install)
            return 0
        if args.command == "daemon":
            from .daemon import run_daemon
            return run_daemon(paths, detach=args.detach) or 0
        if args.command == "info":
            return info(paths)
        if args.command == "boot-state":
            from .client.connection import Connection
            reply = Connection(str(paths.socket)).call(args.qube, "bulkhead.vm.BootState", None,
                                                       b"build" if args.build else b"")
            print(reply.decode() if isinstance(reply, bytes) else reply, end="")
            return 0
        if args.command == "template":
            from .client.app import App
            from .client.connection import Connection
            from .setup.defaults import ensure_template
            from .setup.run import ensure_daemon, prepare
            _, kid, image, key = prepare(paths, install_packages=False)
            ensure_daemon(paths)
            print(ensure_template(App(Connection(str(paths.socket))), image, key, kid))
            return 0
    except (SetupError, QubesException) as e:
        console.print(f"[red]bulkhead {args.command}: {e}[/]")
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def info(paths: Paths) -> int:
    from .backend.accel import detect
    from .setup import kernel, template
    from .setup.run import daemon_answers
    print(f"home:      {paths.home}")
    print(f"socket:    {paths.socket} ({'answering' if daemon_answers(paths) else 'no daemon'})")
    print(f"cache:     {paths.cache}")
    try:
        kid = kernel.kernel_id()
        vmlinux = paths.vm_kernel_image(kid)
        print(f"kernel:    {kid} ({'installed' if vmlinux.exists() else 'not built yet'})")
        if vmlinux.exists():
            print(f"accel:     {detect(vmlinux, paths.cache).describe()}")
        print(f"template:  debian-12 image {template.image_key()}")
    except Exception as e:  # noqa: BLE001 -- info must always print what it can
        print(f"(incomplete: {e})")
    if daemon_answers(paths):
        _print_pools(paths)
    return 0


def _print_pools(paths: Paths) -> None:
    """Each pool's usage, flagged past the daemon's warning threshold."""
    from .client.app import App
    from .client.connection import Connection
    from .storage.monitor import WARN_FRACTION
    try:
        app = App(Connection(str(paths.socket)))
        for pool in app.pools.values():
            name, config = pool.name, pool.config
            size, used = int(config.get("size") or 0), int(config.get("usage") or 0)
            if not size:
                continue
            line = (f"pool:      {name} ({config.get('driver', '?')}) {used / 2**30:.2f} of "
                    f"{size / 2**30:.2f} GiB used ({used * 100 // size} %)")
            if used >= WARN_FRACTION * size:
                line += f"  WARNING: over {WARN_FRACTION * 100:.0f} %: qubes that write more will be paused"
            print(line)
    except Exception as e:  # noqa: BLE001 -- info must always print what it can
        print(f"pools:     (cannot ask the daemon: {e})")


if __name__ == "__main__":
    sys.exit(main())
