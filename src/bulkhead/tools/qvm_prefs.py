"""qvm-prefs: list, get, set or reset a qube's properties.

::

    qvm-prefs work                 # every property: NAME  D|-  VALUE (D: default)
    qvm-prefs work netvm           # one value
    qvm-prefs work netvm sys-net   # set it
    qvm-prefs -D work netvm        # back to its default

The same logic serves qubes-prefs (the global properties): :func:`process_actions`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App
from ..client.holder import NO_VALUE, PropertyHolder
from ..client.toolparser import QubesArgumentParser, run_tool

#: properties whose value is a qube, where "none" means "no qube" (empty)
VM_PROPERTIES_NONE = ("default_dispvm", "netvm", "template", "guivm", "audiovm",
                      "default_netvm", "updatevm", "clockvm", "default_template")


def add_prefs_arguments(parser: QubesArgumentParser) -> QubesArgumentParser:
    parser.add_argument("--help-properties", action="store_true",
                        help="list all available properties with short descriptions and exit")
    parser.add_argument("--hide-default", action="store_true",
                        help="do not show properties that are set to the default value")
    parser.add_argument("--get", "-g", action="store_true",
                        help="ignored; for compatibility with older scripts")
    parser.add_argument("--set", "-s", action="store_true",
                        help="ignored; for compatibility with older scripts")
    parser.add_argument("property", metavar="PROPERTY", nargs="?",
                        help="name of the property to show or change")
    parser.add_argument("value", metavar="VALUE", nargs="?", help="new value of the property")
    parser.add_argument("--default", "-D", dest="delete", action="store_true",
                        help="reset the property to its default value")
    return parser


def get_parser() -> QubesArgumentParser:
    return add_prefs_arguments(QubesArgumentParser(vmname_nargs=1, prog="qvm-prefs",
                                                   description="list or change a qube's properties"))


def _text(value: object) -> str:
    return str(value)  # VM and Label print as their names


def process_actions(parser: QubesArgumentParser, ns: argparse.Namespace,
                    target: PropertyHolder) -> int:
    if ns.help_properties:
        import textwrap  # only here: it compiles regular expressions when imported

        properties = target.property_list()
        width = max((len(p) for p in properties), default=0)
        wrapper = textwrap.TextWrapper(width=80, initial_indent="  ",
                                       subsequent_indent=" " * (width + 6))
        for prop in sorted(properties):
            print(wrapper.fill(f"{prop:{width}s}  {target.property_help(prop)}"))
        return 0

    if ns.property is None:
        if ns.delete or ns.value is not None:
            parser.error("a PROPERTY is required")
        properties = target.property_list()
        # one GetAll (of this qube only) instead of one Get per property
        target.load_all_properties()
        width = max((len(p) for p in properties), default=0)
        for prop in sorted(properties):
            try:
                value = target.get_property(prop)
                is_default = target.property_is_default(prop)
            except errors.QubesNoSuchPropertyError:
                continue
            if value is NO_VALUE:
                print(f"{prop:{width}s}  U")
            elif not is_default:
                print(f"{prop:{width}s}  -  {_text(value)}")
            elif not ns.hide_default:
                print(f"{prop:{width}s}  D  {_text(value)}")
        return 0

    prop = ns.property.replace("-", "_")
    try:
        if ns.value is not None:
            if ns.delete:
                parser.error("cannot both set and reset a property")
            value = ns.value
            if value.lower() == "none" and prop in VM_PROPERTIES_NONE:
                value = ""
            target.set_property(prop, value)
        elif ns.delete:
            target.reset_property(prop)
        else:
            if ns.hide_default and target.property_is_default(prop):
                return 0
            value = target.get_property(prop)
            if value is not None and value is not NO_VALUE:
                print(_text(value))
    except errors.QubesNoSuchPropertyError:
        parser.error(f"no such property: {prop!r}")
    except errors.QubesException as e:
        parser.error_runtime(e)
    return 0


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()
    return run_tool(parser, args, app, lambda ns: process_actions(parser, ns, ns.domains[0]))


if __name__ == "__main__":
    sys.exit(main())
