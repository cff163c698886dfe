"""The volumes each class of qube gets, as Qubes lays them out.

==========  ==========================  ================================
class       root                        private
==========  ==========================  ================================
Template,   own, save_on_stop, 10 GiB   own, save_on_stop, 2 GiB
Standalone
AppVM       snap_on_start of the        own, save_on_stop
            template's root
DispVM      snap_on_start of its        snap_on_start of its disposable
            template's template root    template's private
==========  ==========================  ================================

Every qube also has ``volatile`` (10 GiB, ephemeral: fresh at each start) and
``kernel``: dom0's kernel named by its ``kernel`` property, read-only, in the
``linux-kernel`` pool (a volume whose id is the kernel version, as in Qubes).
A volume's ``vid`` is ``vm-templates/NAME/VOLUME`` for templates and
``appvms/NAME/VOLUME`` otherwise (see ``QubesVM.volume_vid``); a snapshot's
``source`` is ``"POOL:VID"`` of the volume it copies.

The pool of each volume is, in order: ``pools[volume]`` (``pool:VOLUME=`` of
admin.vm.CreateInPool), ``pool`` (``pool=``), else the global
``default_pool_VOLUME`` (which defaults to ``default_pool``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..errors import QubesNoTemplateError
from ..storage.pool import VolumeConfig

if TYPE_CHECKING:  # pragma: no cover
    from .qubesvm import QubesVM

GiB = 1024 ** 3
ROOT_SIZE = 10 * GiB
PRIVATE_SIZE = 2 * GiB
VOLATILE_SIZE = 10 * GiB

#: the volumes admin.vm.CreateInPool may place (Qubes' list)
VOLUME_NAMES = ("root", "private", "volatile", "kernel")


def pool_for(vm: "QubesVM", volume: str, pool: str | None,
             pools: Mapping[str, str] | None) -> str:
    if pools and volume in pools:
        name = pools[volume]
    elif pool:
        name = pool
    else:
        name = getattr(vm.app, "default_pool_" + volume, None) or vm.app.default_pool
    vm.app.pools.check(name)  # QubesPoolNotFoundError if there is no such pool
    return name


def source_of(vm: Any, volume: str) -> str:
    """``"POOL:VID"`` of ``vm``'s volume ``volume`` (what a snapshot of it names)."""
    config = vm.volume_config[volume]
    return f"{config.pool}:{vm.volume_vid(volume)}"


def _template_of(vm: Any) -> Any:
    template = getattr(vm, "template", None)
    if template is None or "root" not in template.volume_config:
        raise QubesNoTemplateError(vm)
    return template


def _volatile(vm: "QubesVM", pool: str | None, pools: Mapping[str, str] | None) -> VolumeConfig:
    return VolumeConfig(name="volatile", pool=pool_for(vm, "volatile", pool, pools),
                        size=VOLATILE_SIZE, rw=True, ephemeral=True,
                        revisions_to_keep=0)


KERNEL_POOL = "linux-kernel"


def _with_kernel(vm: "QubesVM", layout: dict[str, VolumeConfig]) -> dict[str, VolumeConfig]:
    if KERNEL_POOL in vm.app.pools:
        layout["kernel"] = VolumeConfig(name="kernel", pool=KERNEL_POOL, size=0, rw=False,
                                        revisions_to_keep=0)
    return layout


def own_root_layout(vm: "QubesVM", pool: str | None = None,
                    pools: Mapping[str, str] | None = None) -> dict[str, VolumeConfig]:
    """TemplateVM and StandaloneVM: their own root and private, both kept."""
    root_pool = pool_for(vm, "root", pool, pools)
    private_pool = pool_for(vm, "private", pool, pools)
    return _with_kernel(vm, {
        "root": VolumeConfig(name="root", pool=root_pool, size=ROOT_SIZE, rw=True,
                             save_on_stop=True,
                             revisions_to_keep=vm.app.pools.revisions_to_keep(root_pool)),
        "private": VolumeConfig(name="private", pool=private_pool, size=PRIVATE_SIZE, rw=True,
                                save_on_stop=True,
                                revisions_to_keep=vm.app.pools.revisions_to_keep(private_pool)),
        "volatile": _volatile(vm, pool, pools),
    })


def appvm_layout(vm: "QubesVM", pool: str | None = None,
                 pools: Mapping[str, str] | None = None) -> dict[str, VolumeConfig]:
    """AppVM: a fresh snapshot of the template's root at each start, its own private."""
    template = _template_of(vm)
    private_pool = pool_for(vm, "private", pool, pools)
    return _with_kernel(vm, {
        "root": VolumeConfig(name="root", pool=pool_for(vm, "root", pool, pools),
                             size=template.volume_config["root"].size, rw=True,
                             snap_on_start=True, source=source_of(template, "root"),
                             revisions_to_keep=0),
        "private": VolumeConfig(name="private", pool=private_pool, size=PRIVATE_SIZE, rw=True,
                                save_on_stop=True,
                                revisions_to_keep=vm.app.pools.revisions_to_keep(private_pool)),
        "volatile": _volatile(vm, pool, pools),
    })


def dispvm_layout(vm: "QubesVM", pool: str | None = None,
                  pools: Mapping[str, str] | None = None) -> dict[str, VolumeConfig]:
    """DispVM: snapshots of its disposable template's root source and private."""
    dvm_template = _template_of(vm)
    root_source = dvm_template.volume_config["root"].source or source_of(dvm_template, "root")
    return _with_kernel(vm, {
        "root": VolumeConfig(name="root", pool=pool_for(vm, "root", pool, pools),
                             size=dvm_template.volume_config["root"].size, rw=True,
                             snap_on_start=True, source=root_source, revisions_to_keep=0),
        "private": VolumeConfig(name="private", pool=pool_for(vm, "private", pool, pools),
                                size=dvm_template.volume_config["private"].size, rw=True,
                                snap_on_start=True, source=source_of(dvm_template, "private"),
                                revisions_to_keep=0),
        "volatile": _volatile(vm, pool, pools),
    })


def retarget_snapshots(vm: Any) -> None:
    """After a template change: point the snap_on_start volumes at the new template."""
    fresh = type(vm).volume_layout(vm)
    for name, config in vm.volume_config.items():
        if config.snap_on_start and name in fresh:
            config.source = fresh[name].source
            config.size = max(config.size, fresh[name].size)
