"""Qubes' Admin API, served on a unix socket (see :mod:`bulkhead.api.server`).

:func:`load_methods` imports the modules that register the methods; a
module that adds methods (``bulkhead.api.run`` registers the streaming
``bulkhead.vm.Run``) only needs to be listed here.
"""

from __future__ import annotations

import importlib

from .registry import REGISTRY, Call, Registry, method, stream
from .server import AdminServer, Limits

#: modules whose import registers methods; all of them must exist
METHOD_MODULES = (
    "bulkhead.api.admin_vm",
    "bulkhead.api.admin_props",
    "bulkhead.api.admin_misc",
    "bulkhead.api.admin_volume",
    "bulkhead.api.admin_events",
    "bulkhead.api.run",
    "bulkhead.api.volume_import",
    "bulkhead.api.admin_qrexec",
    "bulkhead.api.admin_policy",
    "bulkhead.api.admin_bootstate",
    "bulkhead.api.gui",
    "bulkhead.api.admin_firewall",
)
#: modules other parts of Bulkhead provide; loaded when they are there
OPTIONAL_METHOD_MODULES: tuple[str, ...] = ()


def load_methods() -> Registry:
    """Import every method module (idempotent); returns the registry they filled."""
    for name in METHOD_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_METHOD_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it needs is missing
                raise
    return REGISTRY


__all__ = ["AdminServer", "Call", "Limits", "REGISTRY", "Registry", "load_methods", "method",
           "stream"]
