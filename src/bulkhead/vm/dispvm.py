"""DispVM: a disposable qube, made from a disposable template.

Its root and private volumes are snapshots of its disposable template's, so
nothing it does survives it.  One made on demand (:mod:`bulkhead.disposable`)
has ``auto_cleanup``: when it stops, its definition and volumes are removed.
"""

from __future__ import annotations

from typing import Any

import asyncio
import logging

from ..errors import QubesPropertyValueError
from ..events import handler
from ..properties import LabelProperty, Property, VMProperty
from .net import setter_netvm
from .qubesvm import QubesVM
from .volumes import dispvm_layout


def setter_dispvm_template(vm: Any, prop: Any, value: Any) -> Any:
    if not getattr(value, "template_for_dispvms", False):
        raise QubesPropertyValueError(vm, prop.name, value.name,
                                      f"{value.name!r} is not a disposable template "
                                      f"(template_for_dispvms is False)")
    return value


class DispVM(QubesVM):
    icon_family = "dispvm"
    volume_layout = staticmethod(dispvm_layout)
    netvm_follows_default = False

    template = VMProperty(vmclass=("AppVM", "StandaloneVM"), write_once=True,
                          setter=setter_dispvm_template,
                          doc="The disposable template this disposable is made from.")
    label = LabelProperty(default=lambda vm: vm.template.label,
                          doc="Colour of the qube's windows; default: its disposable "
                              "template's.")
    netvm = VMProperty(allow_none=True, default=lambda vm: vm.template.netvm,
                       setter=setter_netvm,
                       doc="The qube that gives this disposable its network; default: its "
                           "disposable template's netvm.")
    auto_cleanup = Property(type=bool, default=False,
                            doc="Remove the disposable when it stops.")
    dispid = Property(type=int, write_once=True, default=0,
                      doc="The number of a disposable made on demand (its name is "
                          "dispNNNN; its address, once qubes have networks, derives from it).")

    @handler("domain-stopped")
    def _cleanup_on_stop(self, _event: str, **_kwargs: Any) -> None:
        """With ``auto_cleanup``, a disposable that stopped (shut down, killed or
        crashed) is removed with every volume."""
        if self.auto_cleanup:
            asyncio.ensure_future(self._remove_self())

    async def _remove_self(self) -> None:
        try:
            if self.app.domains.get(self.name) is self:
                await self.app.remove_vm(self)
                logging.getLogger(__name__).info("disposable %s removed", self.name)
        except Exception:  # noqa: BLE001 -- the next daemon start tries again
            logging.getLogger(__name__).exception("cannot remove the disposable %s", self.name)
