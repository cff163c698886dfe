"""admin.vm.volume.*: a qube's volumes, through the lifecycle's Volume objects.

Clone is two calls, as in Qubes: ``CloneFrom`` on the source volume answers
a token; ``CloneTo`` on the destination volume, with that token as payload,
replaces the destination's content with a copy of the source's.  A token is
used once; only the :data:`MAX_PENDING_CLONES` newest are kept.
"""

from __future__ import annotations

import secrets
import weakref
from collections import OrderedDict
from typing import Any, Awaitable

from ..errors import (ProtocolError, QubesException, QubesVMNotHaltedError,
                      QubesVolumeNotFoundError, QubesVolumeRevisionNotFoundError,
                      StoragePoolException)
from ..storage.pool import Volume
from .registry import Call, method

MAX_PENDING_CLONES = 64

# app -> token -> (qube name, volume name)
_pending_clones: "weakref.WeakKeyDictionary[Any, OrderedDict[str, tuple[str, str]]]" = \
    weakref.WeakKeyDictionary()


def _volume(call: Call, vm: Any = None, name: str | None = None) -> Volume:
    vm = call.dest if vm is None else vm
    name = call.arg if name is None else name
    if name not in vm.volume_config:
        raise QubesVolumeNotFoundError(f"No volume {name!r} in qube {vm.name!r}")
    lifecycle = call.app.lifecycle
    if lifecycle is None:
        raise QubesException("No VM backend is configured in this daemon")
    return lifecycle.volume(vm, name)


async def _storage(what: str, operation: Awaitable[Any]) -> Any:
    """Await a volume operation; a non-Qubes error becomes StoragePoolException."""
    try:
        return await operation
    except QubesException:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client with its reason
        raise StoragePoolException(f"{what} failed: {exc}") from exc


@method("admin.vm.volume.List", arg=False)
async def volume_list(call: Call) -> str:
    return "".join(f"{name}\n" for name in call.dest.volume_config)


@method("admin.vm.volume.Info", arg=True)
async def volume_info(call: Call) -> str:
    info = _volume(call).info()
    return "".join(f"{key}={value}\n" for key, value in info.items())


@method("admin.vm.volume.ListSnapshots", arg=True)
async def volume_list_snapshots(call: Call) -> str:
    revisions = _volume(call).revisions()
    return "".join(f"{rev}\n" for rev in sorted(revisions, key=revisions.__getitem__))


@method("admin.vm.volume.Revert", arg=True, payload=True)
async def volume_revert(call: Call) -> None:
    volume = _volume(call)
    untrusted_revision = call.payload_text("revision").strip()
    if untrusted_revision not in volume.revisions():
        raise QubesVolumeRevisionNotFoundError(
            f"Revision {untrusted_revision[:64]!r} of {call.dest.name}:{call.arg} not found")
    revision = untrusted_revision
    if not call.dest.is_halted():
        raise QubesVMNotHaltedError(call.dest)
    await _storage("Revert", volume.revert(revision))


@method("admin.vm.volume.Resize", arg=True, payload=True)
async def volume_resize(call: Call) -> None:
    volume = _volume(call)
    size = call.validate_number(call.untrusted_payload, "size")
    if size < volume.size:
        raise StoragePoolException(
            f"For your own safety, shrinking of {call.dest.name}:{call.arg} is disabled "
            f"({size} < {volume.size} bytes): data could be lost")
    # A running qube's volume grows live (the lifecycle asks QEMU, then the qube).
    await _storage("Resize", call.app.lifecycle.resize_volume(call.dest, call.arg, size))
    config = call.dest.volume_config[call.arg]
    config.size = size
    with call.app.transaction():
        call.app.save_volume_config(call.dest)


@method("admin.vm.volume.CloneFrom", arg=True)
async def volume_clone_from(call: Call) -> str:
    _volume(call)  # the volume must exist
    pending = _pending_clones.setdefault(call.app, OrderedDict())
    token = secrets.token_hex(16)
    pending[token] = (call.dest.name, call.arg)
    while len(pending) > MAX_PENDING_CLONES:
        pending.popitem(last=False)
    return token


@method("admin.vm.volume.CloneTo", arg=True, payload=True)
async def volume_clone_to(call: Call) -> None:
    dst_volume = _volume(call)
    untrusted_token = call.payload_text("token").strip()
    pending = _pending_clones.get(call.app, OrderedDict())
    if untrusted_token not in pending:
        raise ProtocolError("invalid or expired clone token")
    src_name, src_volume_name = pending.pop(untrusted_token)
    src_vm = call.app.domains.get(src_name)
    if src_vm is None or src_volume_name not in src_vm.volume_config:
        raise QubesVolumeNotFoundError(f"The source volume {src_name}:{src_volume_name} is gone")
    if not call.dest.is_halted():
        raise QubesVMNotHaltedError(call.dest)
    src_volume = _volume(call, src_vm, src_volume_name)
    await _storage("Clone", dst_volume.clone_from(src_volume))
