"""The qube classes, with Qubes' names: AdminVM, TemplateVM, AppVM, StandaloneVM, DispVM."""

from __future__ import annotations

from ..errors import QubesValueError
from .adminvm import AdminVM
from .appvm import AppVM
from .base import BaseVM, validate_name, validate_tag
from .dispvm import DispVM
from .qubesvm import QubesVM
from .standalonevm import StandaloneVM
from .templatevm import TemplateVM

#: class name -> class, in the order admin.vmclass.List gives them
CLASSES: dict[str, type[BaseVM]] = {
    cls.__name__: cls for cls in (AdminVM, AppVM, DispVM, StandaloneVM, TemplateVM)
}


def vm_class(name: str) -> type[BaseVM]:
    try:
        return CLASSES[name]
    except KeyError:
        raise QubesValueError(f"Unknown qube class {name!r}") from None


__all__ = ["AdminVM", "AppVM", "BaseVM", "CLASSES", "DispVM", "QubesVM", "StandaloneVM",
           "TemplateVM", "validate_name", "validate_tag", "vm_class"]
