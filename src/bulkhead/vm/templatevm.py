"""TemplateVM: the root filesystem AppVMs are built on.

A template's root and private volumes are its own and persist (updates are
installed in the template); its AppVMs see a fresh copy-on-write snapshot of
its root at each start.  Templates have no network by default: as in Qubes,
they get updates through a proxy, not a netvm.
"""

from __future__ import annotations

from typing import Any

from ..properties import VMProperty
from .net import setter_netvm
from .qubesvm import QubesVM
from .volumes import own_root_layout


class TemplateVM(QubesVM):
    icon_family = "templatevm"
    updateable_class = True
    volume_dir = "vm-templates"
    volume_layout = staticmethod(own_root_layout)
    netvm_follows_default = False

    netvm = VMProperty(
        allow_none=True, default=None, setter=setter_netvm,
        doc="The qube that gives this template its network; empty (the default) for none: "
            "templates are updated through a proxy.")

    @property
    def appvms(self) -> list[Any]:
        """The qubes based on this template."""
        return [vm for vm in self.app.domains if getattr(vm, "template", None) is self]
