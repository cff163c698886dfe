"""qvm-create: create a new qube.

::

    qvm-create -l red untrusted2                     # an AppVM on the default template
    qvm-create -t debian-12 -l blue --prop vcpus=2 dev
    qvm-create --standalone -t debian-12 -l green sa # a StandaloneVM: a copy of the template
    qvm-create -C TemplateVM -l black my-template

Exit codes as in Qubes: 1 if the qube could not be created, 2 if it was but
a ``--prop`` could not be set.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import errors
from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool


class _PropertyAction(argparse.Action):
    """``--prop NAME=VALUE``, repeatable, collected into a dict."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        name, sep, value = str(values).partition("=")
        if not sep or not name:
            parser.error(f"invalid property token: {values!r} (expected NAME=VALUE)")
        props = dict(getattr(namespace, self.dest) or {})
        props[name] = value
        setattr(namespace, self.dest, props)


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(prog="qvm-create", description="create a new qube")
    parser.add_argument("--class", "-C", dest="cls", default="AppVM",
                        help="the class of the new qube (default: %(default)s)")
    parser.add_argument("--standalone", action="store_true",
                        help="shortcut for --class StandaloneVM")
    parser.add_argument("--disp", action="store_true",
                        help="alias for --class DispVM --label red")
    parser.add_argument("--property", "--prop", dest="properties", action=_PropertyAction,
                        default={}, metavar="NAME=VALUE",
                        help="set the qube's property, like \"memory\" or \"vcpus\"")
    parser.add_argument("--pool", "-p", action="append", metavar="VOLUME_NAME=POOL_NAME",
                        help="the pool to use for a volume")
    parser.add_argument("-P", dest="one_pool", metavar="POOL_NAME", default="",
                        help="the pool to use for every volume")
    parser.add_argument("--template", "-t", help="the template to base the qube on")
    parser.add_argument("--label", "-l", help="the label (colour) of the new qube, e.g. red")
    parser.add_argument("--help-classes", action="store_true",
                        help="list the available classes and exit")
    root = parser.add_mutually_exclusive_group()
    root.add_argument("--root-copy-from", "-r", metavar="FILENAME",
                      help="use this image as the root volume (not supported yet)")
    root.add_argument("--root-move-from", "-R", metavar="FILENAME",
                      help="use this image as the root volume (not supported yet)")
    parser.add_argument("name", metavar="VMNAME", nargs="?", help="name of the qube to create")
    return parser


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()

    def body(ns: argparse.Namespace) -> int:
        app: App = ns.app
        if ns.help_classes:
            print("\n".join(app.list_vmclass()))
            return 0
        pools: dict[str, str] = {}
        for item in ns.pool or []:
            volume, sep, pool = item.partition("=")
            if not sep or not volume or not pool:
                parser.error("pool argument must be of form: --pool VOLUME_NAME=POOL_NAME")
            pools[volume] = pool
        if ns.one_pool and pools:
            parser.error("-P and --pool cannot be used together")
        if ns.root_copy_from or ns.root_move_from:
            parser.error_runtime("--root-copy-from/--root-move-from are not supported yet")
        label = ns.label
        if ns.disp:
            ns.cls = "DispVM"
            label = label or "red"
        if ns.standalone:
            ns.cls = "StandaloneVM"
        if not label:
            parser.error("--label option is mandatory")
        if not ns.name:
            parser.error("VMNAME is mandatory")
        try:
            app.get_label(label)
        except KeyError:
            parser.error(f"no such label: {label!r}; available: {', '.join(app.labels)}")

        properties = dict(ns.properties)
        try:
            if ns.cls == "StandaloneVM" and ns.template:
                # a "template-based" StandaloneVM is a copy of the template's
                # root (its private volume starts empty), as in Qubes
                vm = app.clone_vm(ns.template, ns.name, new_cls=ns.cls, pool=ns.one_pool or None,
                                  pools=pools or None, ignore_volumes=("private",))
                properties.setdefault("label", label)
            else:
                vm = app.add_new_vm(ns.cls, ns.name, label, template=ns.template,
                                    pool=ns.one_pool or None, pools=pools or None)
        except KeyError as e:
            parser.error_runtime(f"no such domain: {e.args[0]!r}")
        except errors.QubesException as e:
            parser.error_runtime(f"cannot create {ns.name}: {e}")

        exit_code = 0
        for prop, value in properties.items():
            try:
                vm.set_property(prop, value)
            except errors.QubesException as e:
                print(f"{parser.prog}: error: cannot set property {prop} (but the qube was "
                      f"created): {e}", file=sys.stderr)
                exit_code = 2
        return exit_code

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
