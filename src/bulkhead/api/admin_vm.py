"""admin.vmclass.List, admin.vm.{List, Create, CreateInPool, Remove, Start, Shutdown,
Kill, Pause, Unpause, CurrentState}: the qubes themselves."""

from __future__ import annotations

import string

from ..errors import ProtocolError, QubesLabelNotFoundError, QubesValueError
from ..labels import Label, get_label
from ..vm import CLASSES, validate_name
from ..vm.volumes import VOLUME_NAMES
from .registry import Call, method

#: the classes admin.vm.Create.* can make (dom0 exists once, from the start)
CREATABLE = tuple(name for name in CLASSES if name != "AdminVM")

_LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


@method("admin.vmclass.List", dest="dom0", arg=False)
async def vmclass_list(call: Call) -> str:
    return "".join(f"{name}\n" for name in sorted(CLASSES))


@method("admin.vm.List", arg=False)
async def vm_list(call: Call) -> str:
    domains = list(call.app.domains) if call.dest.qid == 0 else [call.dest]
    return "".join(f"{vm.name} class={type(vm).__name__} state={vm.get_power_state()}\n"
                   for vm in domains)


@method("admin.vm.Create.{endpoint}", endpoints=CREATABLE, dest="dom0", payload=True)
async def vm_create(call: Call) -> None:
    await _create(call, allow_pool=False)


@method("admin.vm.CreateInPool.{endpoint}", endpoints=CREATABLE, dest="dom0", payload=True)
async def vm_create_in_pool(call: Call) -> None:
    await _create(call, allow_pool=True)


async def _create(call: Call, allow_pool: bool) -> None:
    """Payload: ``name=NAME label=LABEL`` [``pool=POOL`` | ``pool:VOLUME=POOL``...];
    the argument, if any, is the template."""
    app = call.app
    klass = call.endpoint
    assert klass is not None
    name: str | None = None
    label: Label | None = None
    pool: str | None = None
    pools: dict[str, str] = {}
    for untrusted_param in call.payload_text().split(" "):
        untrusted_key, sep, untrusted_value = untrusted_param.partition("=")
        if not sep:
            raise ProtocolError("invalid parameter: expected key=value")
        if untrusted_key == "name":
            call.enforce(name is None, "duplicated parameters")
            name = validate_name(None, None, untrusted_value)
        elif untrusted_key == "label":
            call.enforce(label is None, "duplicated parameters")
            # An index would be a different way to say a label; Qubes refuses it here.
            call.enforce(not untrusted_value.isdigit(), "label must be given by name")
            call.enforce(untrusted_value and set(untrusted_value) <= _LABEL_CHARS,
                         "invalid label name")
            try:
                label = get_label(untrusted_value)
            except QubesLabelNotFoundError:
                raise QubesValueError(f"Label does not exist: {untrusted_value}") from None
        elif untrusted_key == "pool" and allow_pool:
            call.enforce(pool is None, "duplicated pool parameter")
            app.pools.check(untrusted_value)
            pool = untrusted_value
        elif untrusted_key.startswith("pool:") and allow_pool:
            untrusted_volume = untrusted_key[5:]
            call.enforce(untrusted_volume in VOLUME_NAMES, "invalid volume name")
            call.enforce(untrusted_volume not in pools,
                         f"duplicated pool:{untrusted_volume} parameter")
            app.pools.check(untrusted_value)
            pools[untrusted_volume] = untrusted_value
        else:
            raise ProtocolError("Invalid param name")
    if name is None or label is None:
        raise ProtocolError("Missing name or label")
    if pool and pools:
        raise ProtocolError("Only one of 'pool=' and 'pool:volume=' can be used")
    template = None
    if call.arg:
        validate_name(None, None, call.arg)
        template = app.domains[call.arg]
    if name in app.domains:
        raise QubesValueError(f"VM {name} already exists")
    await app.create_vm(klass, name=name, label=label, template=template, pool=pool,
                        pools=pools or None, tags=("created-by-" + call.src.name,))


@method("admin.vm.Remove", arg=False)
async def vm_remove(call: Call) -> None:
    await call.app.remove_vm(call.dest)


@method("admin.vm.Start", arg=False)
async def vm_start(call: Call) -> None:
    await call.dest.start()  # type: ignore[attr-defined]


@method("admin.vm.Shutdown")
async def vm_shutdown(call: Call) -> None:
    options = call.arg.split("+") if call.arg else []
    call.enforce(all(option in ("force", "wait") for option in options),
                 "admin.vm.Shutdown accepts only 'force' and 'wait'")
    await call.dest.shutdown(force="force" in options,  # type: ignore[attr-defined]
                             wait="wait" in options)


@method("admin.vm.Kill", arg=False)
async def vm_kill(call: Call) -> None:
    await call.dest.kill()  # type: ignore[attr-defined]


@method("admin.vm.Pause", arg=False)
async def vm_pause(call: Call) -> None:
    await call.dest.pause()  # type: ignore[attr-defined]


@method("admin.vm.Unpause", arg=False)
async def vm_unpause(call: Call) -> None:
    await call.dest.unpause()  # type: ignore[attr-defined]


@method("admin.vm.CurrentState", arg=False)
async def vm_current_state(call: Call) -> str:
    state = call.dest.current_state()  # type: ignore[attr-defined]
    return " ".join(f"{key}={value}" for key, value in state.items())


@method("admin.vm.CreateDisposable", arg=False)
async def create_disposable(call: Call) -> str:
    """A new disposable of the destination's disposable template (its
    ``default_dispvm``; on dom0 the global one, or the destination itself if it
    is a disposable template); its name.  A preloaded one (running) if one is ready,
    else a new one (halted).  It is removed once it stops."""
    from ..disposable import get_disposable as make

    dest = call.dest
    if getattr(dest, "template_for_dispvms", False):
        base = dest
    else:
        base = getattr(dest, "default_dispvm", None)
    if base is None:
        raise QubesValueError(f"{dest.name!r} has no default_dispvm to make a disposable of")
    vm = await make(call.app, base)
    return vm.name
