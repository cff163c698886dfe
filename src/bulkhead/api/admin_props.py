"""admin.vm.property.* (a qube's properties) and admin.property.* (the global ones).

Formats, as Qubes':

- Get: ``default=True|False type=TYPE VALUE`` (TYPE: str, int, bool, vm,
  label; VALUE empty for None; ``default=True type=TYPE `` if unset with no
  default);
- GetAll: one ``NAME default=... type=... VALUE`` line per property, sorted,
  with ``\\`` and newlines escaped as ``\\\\`` and ``\\n``;
- ``bulkhead.vm.property.GetAllOfAll`` (Bulkhead's own; on dom0, no
  argument, no payload): the GetAll of every qube in one reply, for listings
  (qvm-ls).  Each line is a qube's name, one space, then one line of that
  qube's GetAll, byte for byte (escaping included)::

      QUBE NAME default=True|False type=TYPE VALUE\\n

  The qubes come in ``admin.vm.List``'s order (by name, dom0 included), all
  the lines of one qube together, its properties sorted by name.  A qube's
  name has no space, ``\\`` nor newline, so splitting a line at its first
  space gives the qube and its GetAll line.  Qubes' qubesd has no such
  method: a client falls back to one GetAll per qube when it is refused;
- GetDefault: ``type=TYPE VALUE``, or an empty body if there is no default;
- List: one name per line; Help: the property's documentation;
- Set: the new value as the payload (empty for None); Reset: no payload.
"""

from __future__ import annotations

from typing import Any

from ..properties import Property, PropertyHolder
from .registry import Call, method


def _serialize(holder: PropertyHolder, prop: Property) -> str:
    """Get's body: ``default=True|False type=TYPE VALUE``."""
    try:
        is_default, value = holder.property_value(prop)
    except AttributeError:
        return f"default=True type={prop.wire_type} "
    return f"default={is_default} type={prop.wire_type} {prop.to_text(value)}"


def _get_all(holder: PropertyHolder, prefix: str = "") -> str:
    """GetAll's body, each line prefixed with ``prefix`` (GetAllOfAll's qube name)."""
    lines = []
    for prop in holder.property_list():
        text = _serialize(holder, prop)
        if "\\" in text or "\n" in text:
            text = text.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"{prefix}{prop.name} {text}\n")
    return "".join(lines)


def _register(prefix: str, dest: str, holder_of: Any) -> None:
    """Register the seven property methods under ``prefix`` (vm or global)."""

    @method(prefix + "List", dest=dest, arg=False)
    async def property_list(call: Call) -> str:
        return "".join(f"{name}\n" for name in holder_of(call).property_names())

    @method(prefix + "Get", dest=dest, arg=True)
    async def property_get(call: Call) -> str:
        holder = holder_of(call)
        return _serialize(holder, holder.property_get_def(call.arg))

    @method(prefix + "GetAll", dest=dest, arg=False)
    async def property_get_all(call: Call) -> str:
        return _get_all(holder_of(call))

    @method(prefix + "GetDefault", dest=dest, arg=True)
    async def property_get_default(call: Call) -> str | None:
        holder = holder_of(call)
        prop = holder.property_get_def(call.arg)
        try:
            value = prop.get_default(holder)
        except AttributeError:
            return None
        return f"type={prop.wire_type} {prop.to_text(value)}"

    @method(prefix + "Set", dest=dest, arg=True, payload=None)
    async def property_set(call: Call) -> None:
        holder = holder_of(call)
        prop = holder.property_get_def(call.arg)
        value = prop.sanitize(holder, call.untrusted_payload)
        with call.app.transaction():
            setattr(holder, prop.name, value)

    @method(prefix + "Reset", dest=dest, arg=True)
    async def property_reset(call: Call) -> None:
        holder = holder_of(call)
        holder.property_get_def(call.arg)
        with call.app.transaction():
            holder.property_reset(call.arg)

    @method(prefix + "Help", dest=dest, arg=True)
    async def property_help(call: Call) -> str:
        return holder_of(call).property_get_def(call.arg).doc


_register("admin.vm.property.", "any", lambda call: call.dest)
_register("admin.property.", "dom0", lambda call: call.app)


@method("bulkhead.vm.property.GetAllOfAll", dest="dom0", arg=False)
async def property_get_all_of_all(call: Call) -> str:
    """Every qube's GetAll in one reply (see the module documentation for the format)."""
    return "".join([_get_all(vm, vm.name + " ") for vm in call.app.domains])
