"""StandaloneVM: a qube with a root of its own, not tied to a template.

Its root and private volumes persist, like a template's; it is where an HVM
(another OS booting from its own disk or an installer ISO) lives.
"""

from __future__ import annotations

from .appvm import DVMTemplateMixin
from .qubesvm import QubesVM
from .volumes import own_root_layout


class StandaloneVM(DVMTemplateMixin, QubesVM):
    icon_family = "standalonevm"
    updateable_class = True
    volume_layout = staticmethod(own_root_layout)
