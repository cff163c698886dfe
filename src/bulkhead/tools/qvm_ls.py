"""qvm-ls: list qubes and their properties, as a table (or raw, for scripts).

The default columns are Qubes' ``simple`` format::

    NAME     STATE    CLASS   LABEL  TEMPLATE  NETVM
    dom0     Running  AdminVM black  -         -

Any qube property can be a column (``-O name,memory,vcpus``); an empty or
absent value shows as ``-``.  The properties of every qube come from one
``bulkhead.vm.property.GetAllOfAll`` call (from a daemon without it, as
Qubes' qubesd, one ``GetAll`` per qube) and the states from the
``admin.vm.List`` reply, so a listing costs two calls.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .. import errors
from ..client import App, VM
from ..client.table import print_table
from ..client.toolparser import QubesArgumentParser, run_tool

FORMATS: dict[str, tuple[str, ...]] = {
    "simple": ("name", "state", "class", "label", "template", "netvm"),
    "network": ("name", "state", "netvm", "ip", "ipback", "gateway"),
    "full": ("name", "state", "class", "label", "qid", "xid", "uuid"),
    "disk": ("name", "state", "disk", "priv-curr", "priv-max", "priv-used",
             "root-curr", "root-max", "root-used"),
}

POWER_FILTERS = {"running": "Running", "paused": "Paused", "halted": "Halted"}


def _attr(vm: VM, path: str) -> object:
    value: object = vm
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _mib(vm: VM, volume: str, what: str) -> int:
    vol = vm.volumes.get(volume)
    return 0 if vol is None else getattr(vol, what) // 1024 // 1024


def _used_percent(vm: VM, volume: str) -> int:
    size = _mib(vm, volume, "size")
    return 0 if size == 0 else _mib(vm, volume, "usage") * 100 // size


_FLAG_TYPES = {"AdminVM": "0", "TemplateVM": "t", "AppVM": "a", "StandaloneVM": "s", "DispVM": "d"}
_FLAG_POWER = {"running": "r", "transient": "t", "paused": "p", "suspended": "s",
               "halting": "h", "dying": "d", "crashed": "c", "na": "?"}
_FLAG_BOOLS = (("U", "updateable"), ("N", "provides_network"), ("R", "installed_by_rpm"),
               ("i", "internal"), ("D", "debug"), ("A", "autostart"))


def _flags(vm: VM) -> str:
    """Qubes' FLAGS column: type (capital for HVM), power, then one letter per set flag."""
    kind = _FLAG_TYPES.get(vm.klass, "-")
    if kind not in "0-" and getattr(vm, "virt_mode", "") == "hvm":
        kind = kind.upper()
    power = _FLAG_POWER.get(vm.get_power_state().lower(), "-")
    rest = "".join(letter if getattr(vm, attr, False) else "-" for letter, attr in _FLAG_BOOLS)
    return kind + power + rest


#: Columns that are not plain properties: head -> (how to compute, description)
SPECIAL_COLUMNS: dict[str, tuple[Callable[[VM], object], str]] = {
    "NAME": (lambda vm: vm.name, "Name of the qube."),
    "STATE": (lambda vm: vm.get_power_state(), "Current power state."),
    "CLASS": (lambda vm: vm.klass, "Class of the qube."),
    "FLAGS": (_flags, "Type, power state and flags (see Qubes' qvm-ls)."),
    "GATEWAY": (lambda vm: _attr(vm, "netvm.gateway"), "Network gateway."),
    "MEMORY": (lambda vm: int(vm.current_state()["mem"]) // 1024 if vm.is_running() else None,
               "Memory currently used by the qube (MiB)."),
    "MEM": (lambda vm: int(vm.current_state()["mem"]) // 1024 if vm.is_running() else None,
            "Memory the qube holds on the host now, its QEMU's PSS (MiB)."),
    "DISK": (lambda vm: vm.get_disk_utilization() // 1024 // 1024, "Total disk utilisation (MiB)."),
    "PRIV-CURR": (lambda vm: _mib(vm, "private", "usage"), "Disk used by the private volume."),
    "PRIV-MAX": (lambda vm: _mib(vm, "private", "size"), "Size of the private volume."),
    "PRIV-USED": (lambda vm: _used_percent(vm, "private"), "Private volume use, in percent."),
    "ROOT-CURR": (lambda vm: _mib(vm, "root", "usage"), "Disk used by the root volume."),
    "ROOT-MAX": (lambda vm: _mib(vm, "root", "size"), "Size of the root volume."),
    "ROOT-USED": (lambda vm: _used_percent(vm, "root"), "Root volume use, in percent."),
}


class Column:
    """One column: its head (``VIRT-MODE``) and how to get a cell's text."""

    def __init__(self, name: str) -> None:
        self.head = name.upper().replace("_", "-")
        special = SPECIAL_COLUMNS.get(self.head)
        if special is not None:
            self._get = special[0]
        else:
            prop = name.lower().replace("-", "_")
            self._get = lambda vm: getattr(vm, prop)

    def cell(self, vm: VM) -> str:
        try:
            value = self._get(vm)
        except (AttributeError, KeyError, ZeroDivisionError, errors.QubesNoSuchPropertyError):
            value = None
        text = "" if value is None else str(value)
        return text or "-"


def _sort_key(text: str, ignore_case: bool) -> tuple[int, float, str]:
    if text == "-":
        return (0, 0.0, "")
    try:
        return (1, float(text), "")
    except ValueError:
        return (2, 0.0, text.lower() if ignore_case else text)


def _selected(ns: argparse.Namespace, vm: VM) -> bool:
    states = [POWER_FILTERS[f] for f in POWER_FILTERS if getattr(ns, f)]
    if states and vm.get_power_state() not in states:
        return False
    if ns.klass and vm.klass not in ns.klass:
        return False
    if ns.tags or ns.exclude_tags:
        tags = set(vm.tags)
        if ns.tags and not tags.intersection(ns.tags):
            return False
        if tags.intersection(ns.exclude_tags):
            return False
    for option, prop in (("label", "label"), ("template_source", "template"),
                         ("netvm_is", "netvm")):
        wanted = getattr(ns, option)
        if wanted and str(getattr(vm, prop, None)) not in wanted:
            return False
    return True


class _HelpColumns(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list the special columns and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        width = max(len(h) for h in SPECIAL_COLUMNS)
        text = "Available columns:\n" + "".join(
            f"  {head:{width}s}  {doc}\n" for head, (_, doc) in sorted(SPECIAL_COLUMNS.items()))
        text += "\nAdditionally any qube property may be used as a column " \
                "(see qvm-prefs QUBE for the list).\n"
        parser.exit(message=text)


class _HelpFormats(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list the preset formats and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        width = max(len(f) for f in FORMATS)
        parser.exit(message="Available formats:\n" + "".join(
            f"  {fmt:{width}s}  {','.join(cols).upper()}\n" for fmt, cols in sorted(FORMATS.items())))


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs="*", prog="qvm-ls",
                                 description="List qubes and their parameters.",
                                 all_help="list all qubes (the default)")
    parser.add_argument("--help-columns", action=_HelpColumns)
    parser.add_argument("--help-formats", action=_HelpFormats)
    formats = parser.add_mutually_exclusive_group()
    formats.add_argument("--format", "-o", metavar="FORMAT", choices=sorted(FORMATS),
                         default="simple", help="preset format (see --help-formats)")
    formats.add_argument("--fields", "--field", "-O", metavar="FIELD,...",
                         help="user specified columns, comma separated")
    raw = parser.add_mutually_exclusive_group()
    raw.add_argument("--raw-data", action="store_true",
                     help="print the cells separated by '|', without the header (for scripts)")
    raw.add_argument("--raw-list", action="store_true", help="print only the qube names")
    for flag, state in POWER_FILTERS.items():
        parser.add_argument("--" + flag, action="store_true", help=f"show {state.lower()} qubes")
    parser.add_argument("--tags", nargs="+", metavar="TAG", default=[],
                        help="show only qubes having any of these tags")
    parser.add_argument("--exclude-tags", nargs="+", metavar="TAG", default=[],
                        help="exclude qubes having any of these tags")
    parser.add_argument("--class", dest="klass", nargs="+", metavar="CLASS", default=[],
                        help="show only qubes of these classes")
    parser.add_argument("--label", nargs="+", metavar="LABEL", default=[],
                        help="show only qubes with these labels")
    parser.add_argument("--template-source", nargs="+", metavar="TEMPLATE", default=[],
                        help="show only qubes based on these templates")
    parser.add_argument("--netvm-is", nargs="+", metavar="NETVM", default=[],
                        help="show only qubes connected to these netvms")
    parser.add_argument("--sort", metavar="COLUMN", help="sort by this column (default NAME)")
    parser.add_argument("--reverse", action="store_true", help="reverse the sort order")
    parser.add_argument("--ignore-case", action="store_true", help="sort ignoring case")
    parser.add_argument("--spinner", "--no-spinner", action="store_true",
                        help=argparse.SUPPRESS)  # Qubes' progress spinner: nothing to wait for here
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        ns.app.cache_enabled = True
        if ns.all_domains:
            # unlike other tools, qvm-ls --all is the full list, dom0 included
            excluded = set(ns.exclude)
            domains = [vm for vm in ns.app.domains if vm.name not in excluded]
        else:
            domains = ns.domains or list(ns.app.domains)
        domains = [vm for vm in sorted(domains) if _selected(ns, vm)]
        if ns.raw_list:
            for vm in domains:
                print(vm.name)
            return 0
        names = ([f.strip() for f in ns.fields.split(",") if f.strip()] if ns.fields
                 else list(FORMATS[ns.format]))
        columns = [Column(name) for name in names]
        rows = [[col.cell(vm) for col in columns] for vm in domains]
        if ns.sort:
            head = ns.sort.upper().replace("_", "-")
            heads = [col.head for col in columns]
            if head not in heads:
                parser.error(f"cannot sort by {ns.sort!r}: it is not one of the columns")
            index = heads.index(head)
            rows.sort(key=lambda row: _sort_key(row[index], ns.ignore_case), reverse=ns.reverse)
        elif ns.reverse:
            rows.reverse()
        if ns.raw_data:
            for row in rows:
                print("|".join(row))
        else:
            print_table([[col.head for col in columns], *rows], sys.stdout)
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
