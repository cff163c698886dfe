"""AppVM: a qube for one activity, built on a template.

Its root is a snapshot of its template's root, thrown away at shutdown; its
private volume (``/rw``, with ``/home``) is its own and persists.  An AppVM
with ``template_for_dispvms=True`` is a *disposable template*: DispVMs are
made from it.
"""

from __future__ import annotations

from typing import Any

from ..errors import QubesPropertyValueError, QubesVMNotHaltedError
from ..events import handler
from ..properties import Property, VMProperty
from .qubesvm import QubesVM
from .volumes import appvm_layout, retarget_snapshots


def setter_template(vm: Any, prop: Any, value: Any) -> Any:
    # Changing the root under a running machine would corrupt it.
    if vm.events_enabled and not vm.is_halted():
        raise QubesVMNotHaltedError(vm, "Cannot change template while qube is running")
    return value


def dispvms_of(vm: Any) -> list[Any]:
    return [other for other in vm.app.domains
            if type(other).__name__ == "DispVM" and getattr(other, "template", None) is vm]


class DVMTemplateMixin:
    """``template_for_dispvms``, for the classes DispVMs can be made from."""

    template_for_dispvms = Property(
        type=bool, default=False,
        doc="This qube is a disposable template: DispVMs can be made from it.")

    @handler("property-pre-set:template_for_dispvms")
    def _on_pre_set_template_for_dispvms(self, event: str, name: str, newvalue: bool,
                                         oldvalue: Any = None) -> None:
        if not newvalue and dispvms_of(self):
            raise QubesPropertyValueError(
                self, name, newvalue,
                "Cannot change template_for_dispvms to False while there are DispVMs based "
                "on this qube: " + ", ".join(vm.name for vm in dispvms_of(self)))

    @property
    def dispvms(self) -> list[Any]:
        return dispvms_of(self)


class AppVM(DVMTemplateMixin, QubesVM):
    volume_layout = staticmethod(appvm_layout)

    template = VMProperty(vmclass="TemplateVM", setter=setter_template,
                          doc="The template this qube's root filesystem comes from.")

    @handler("property-set:template")
    def _on_set_template(self, event: str, name: str, newvalue: Any, oldvalue: Any = None) -> None:
        retarget_snapshots(self)
        self.app.save_volume_config(self)
