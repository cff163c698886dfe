"""qvm-volume: list qubes' volumes, show one, revert it to a kept revision, grow it.

::

    qvm-volume [list] [-p POOL] [VMNAME... | --all]
    qvm-volume info VM:VOLUME [PROPERTY]
    qvm-volume revert VM:VOLUME [REVISION]      # default: the latest kept revision
    qvm-volume resize VM:VOLUME SIZE            # alias: extend; SIZE like 20GiB, 10G, 1073741824
    qvm-volume config VM:VOLUME rw|revisions_to_keep VALUE

Sizes follow Qubes: K, M, G (and KB, MB, GB) are powers of 1000; Ki, Mi,
Gi (and KiB, MiB, GiB) powers of 1024.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from .. import errors
from ..client import App, Volume
from ..client.table import print_table
from ..client.toolparser import QubesArgumentParser, add_subcommands, run_tool

INFO_ITEMS = ("pool", "vid", "rw", "source", "save_on_stop", "snap_on_start", "size",
              "usage", "revisions_to_keep")
SETTABLE = ("rw", "revisions_to_keep", "ephemeral")

_UNITS = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4,
          "KI": 1024, "MI": 1024 ** 2, "GI": 1024 ** 3, "TI": 1024 ** 4}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]I?)?B?\s*$")


def parse_size(text: str) -> int:
    """``10GiB`` -> 10737418240, ``10G`` -> 10000000000, ``512`` -> 512."""
    match = _SIZE.match(text.upper())
    if not match:
        raise errors.QubesValueError(f"invalid size: {text!r} (examples: 20GiB, 10G, 1073741824)")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def _volume(parser: QubesArgumentParser, app: App, spec: str) -> Volume:
    vm_name, sep, volume_name = spec.partition(":")
    if not sep or not vm_name or not volume_name:
        parser.error(f"expected a qube and volume like work:private, not {spec!r}")
    vm = parser.lookup(app, [vm_name])[0]
    try:
        return vm.volumes[volume_name]
    except KeyError:
        parser.error_runtime(f"qube {vm_name!r} has no volume {volume_name!r}")


def list_volumes(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    app: App = ns.app
    if ns.all_domains or not ns.names:
        excluded = set(ns.exclude)
        domains = [vm for vm in app.domains if vm.klass != "AdminVM" and vm.name not in excluded]
    else:
        if ns.exclude:
            parser.error("--exclude can only be used with --all")
        domains = parser.lookup(app, ns.names)
    if ns.pools:
        unknown = [p for p in ns.pools if p not in app.pools]
        if unknown:
            parser.error(f"no such pool: {', '.join(map(repr, unknown))}")
    rows = []
    for vm in domains:
        for name, volume in vm.volumes.items():
            if ns.pools and volume.pool not in ns.pools:
                continue
            rows.append((volume.pool, volume.vid, vm.name, name,
                         "Yes" if volume.revisions else "No"))
    rows.sort()
    print_table([("POOL:VOLUME", "VMNAME", "VOLUME_NAME", "REVERT_POSSIBLE")]
                + [(f"{pool}:{vid}", vm, name, revert) for pool, vid, vm, name, revert in rows])


def info_volume(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    volume = _volume(parser, ns.app, ns.volume)
    if ns.property:
        if ns.property == "revisions":
            for revision in volume.revisions:
                print(revision)
        elif ns.property in volume.info or ns.property in INFO_ITEMS:
            print(volume.info.get(ns.property, ""))
        else:
            parser.error_runtime(f"no such property: {ns.property!r}")
        return
    items = [(key, volume.info.get(key, "")) for key in INFO_ITEMS]
    items.append(("is_outdated", str(volume.is_outdated())))
    if "ephemeral" in volume.info:
        items.append(("ephemeral", volume.info["ephemeral"]))
    print_table(items)
    revisions = volume.revisions
    if revisions:
        print("Available revisions (for revert):")
        for revision in revisions:
            print("  " + revision)
    else:
        print("Available revisions (for revert): none")


def revert_volume(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    volume = _volume(parser, ns.app, ns.volume)
    revision = ns.revision
    if not revision:
        revisions = volume.revisions
        if not revisions:
            raise errors.StoragePoolException("No snapshots available")
        revision = revisions[-1]  # the newest
    volume.revert(revision)


def resize_volume(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    volume = _volume(parser, ns.app, ns.volume)
    volume.resize(parse_size(ns.size))


def config_volume(parser: QubesArgumentParser, ns: argparse.Namespace) -> None:
    volume = _volume(parser, ns.app, ns.volume)
    if ns.property not in SETTABLE:
        parser.error_runtime(f"invalid property: {ns.property!r} (one of: {', '.join(SETTABLE)})")
    volume.set(ns.property, ns.value)


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(prog="qvm-volume", description="Qubes volume management")
    sub = add_subcommands(parser)

    p = sub.add_parser("list", aliases=["ls", "l"], help="list storage volumes")
    p.add_argument("-p", "--pool", dest="pools", action="append", default=[], metavar="POOL",
                   help="only volumes in this pool (repeatable)")
    p.add_argument("--full", action="store_true", help="accepted for compatibility")
    p.add_argument("--all", dest="all_domains", action="store_true", help="all qubes (the default)")
    p.add_argument("--exclude", action="append", default=[], help="exclude the qube from --all")
    p.add_argument("names", metavar="VMNAME", nargs="*", help="list the volumes of these qubes")
    p.set_defaults(func=list_volumes)

    p = sub.add_parser("info", aliases=["i"], help="show a volume's details")
    p.add_argument("volume", metavar="VM:VOLUME")
    p.add_argument("property", nargs="?",
                   help="show only this property ('revisions' lists the kept revisions)")
    p.set_defaults(func=info_volume)

    p = sub.add_parser("revert", aliases=["rv", "r"], help="revert a volume to a kept revision")
    p.add_argument("volume", metavar="VM:VOLUME")
    p.add_argument("revision", metavar="REVISION", nargs="?",
                   help="the revision (default: the latest one)")
    p.set_defaults(func=revert_volume)

    p = sub.add_parser("resize", aliases=["extend"], help="grow a volume")
    p.add_argument("volume", metavar="VM:VOLUME")
    p.add_argument("size", metavar="SIZE", help="the new size, like 20GiB or 10G (bytes if bare)")
    p.set_defaults(func=resize_volume)

    p = sub.add_parser("config", aliases=["c", "set", "s"], help="change a volume's setting")
    p.add_argument("volume", metavar="VM:VOLUME")
    p.add_argument("property", metavar="PROPERTY", help=" or ".join(SETTABLE))
    p.add_argument("value", metavar="VALUE")
    p.set_defaults(func=config_volume)

    parser.set_defaults(func=list_volumes, pools=[], all_domains=False, exclude=[], names=[])
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()
    return run_tool(parser, args, app, lambda ns: ns.func(parser, ns))


if __name__ == "__main__":
    sys.exit(main())
