"""The qubes a fresh install has, created through the Admin API like any client would.

As a fresh Qubes install: the template ``debian-12``; ``sys-net`` and
``sys-firewall`` (providing network; their links come with the networking
work); ``work`` (blue), ``personal`` (yellow), ``untrusted`` (red), ``vault``
(black, no network); and the disposable template ``default-dvm``.  Every step
checks what exists first, so running it again changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..client.app import App
from .progress import console, step

TEMPLATE = "debian-12"
TOR_TEMPLATE = "debian-12-tor"   # sys-tor's: debian-12 and Debian's tor (setup.template.TOR)
IMAGE_FEATURE = "bulkhead.image"  # which template image the template's root came from

# name, class, label, {property: value}  (None means "no value", i.e. qvm-prefs NAME PROP '')
DEFAULT_QUBES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("sys-net", "AppVM", "red", {"provides_network": True, "netvm": None}),
    ("sys-firewall", "AppVM", "green", {"provides_network": True, "netvm": "sys-net"}),
    ("work", "AppVM", "blue", {}),
    ("personal", "AppVM", "yellow", {}),
    ("untrusted", "AppVM", "red", {}),
    ("vault", "AppVM", "black", {"netvm": None}),
    # The Tor gateway (Whonix-Gateway's role): halted until a qube uses it as its netvm.
    ("sys-tor", "AppVM", "purple", {"provides_network": True, "netvm": "sys-firewall",
                                    "template": TOR_TEMPLATE}),
    ("default-dvm", "AppVM", "red", {"template_for_dispvms": True}),
]
GLOBALS_AFTER = [("default_netvm", "sys-firewall"), ("updatevm", "sys-firewall"),
                 ("clockvm", "sys-net"), ("default_dispvm", "default-dvm")]


def _set_global(app: App, prop: str, value: Any) -> bool:
    try:
        current = getattr(app, prop)
    except AttributeError:
        current = None
    if str(current or "") == str(value or ""):
        return False
    setattr(app, prop, value)
    return True


def ensure_template(app: App, image: Path, image_key: str, kernel: str,
                    name: str = TEMPLATE) -> str:
    """Create the template ``name`` if missing; (re)import its root when the image changed."""
    _set_global(app, "default_kernel", kernel)
    if name not in app.domains:
        with step(f"Creating the template {name}"):
            app.add_new_vm("TemplateVM", name, "black")
    vm = app.domains[name]
    if vm.features.get(IMAGE_FEATURE) == image_key:
        return "up to date"
    if not vm.is_halted():
        console.print(f"[yellow]![/] {name} runs, so its new root image is not imported now; "
                      f"shut it down and run `bulkhead setup` again")
        return "running"
    with step(f"Importing the root image into {name}"):
        app.call(name, "bulkhead.vm.volume.ImportFile", "root", str(image).encode())
        vm.features[IMAGE_FEATURE] = image_key
    if name == TEMPLATE:
        _set_global(app, "default_template", TEMPLATE)
    return "imported"


def _move_to_own_template(app: App, name: str, props: dict[str, Any]) -> None:
    """An install from before sys-tor had a template of its own: debian-12 has no tor
    any more, so sys-tor moves to debian-12-tor (when halted; else at the next setup)."""
    want = props.get("template")
    if want is None or want not in app.domains:
        return
    vm = app.domains[name]
    if str(getattr(vm, "template", "")) == TEMPLATE and vm.is_halted():
        with step(f"Moving {name} to the template {want}"):
            vm.template = want


def ensure_default_qubes(app: App, uplink: str = "passt") -> list[str]:
    created = []
    _set_global(app, "default_template", TEMPLATE)
    for name, klass, label, props in DEFAULT_QUBES:
        if name in app.domains:
            _move_to_own_template(app, name, props)
            continue
        with step(f"Creating {name} ({klass}, {label})"):
            vm = app.add_new_vm(klass, name, label, template=props.get("template", TEMPLATE))
            for prop, value in props.items():
                if prop == "template":
                    continue
                setattr(vm, prop, value)
            if name == "sys-net":
                # sys-net's uplink (bulkhead.network.uplink): a new install's choice.
                vm.features["uplink"] = uplink
            if name == "sys-tor":
                vm.features["tor-gateway"] = "1"
        created.append(name)
        if name == "sys-firewall":
            _set_global(app, "default_netvm", "sys-firewall")
    for prop, value in GLOBALS_AFTER:
        _set_global(app, prop, value)
    return created
