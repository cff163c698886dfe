"""admin.vm.property.* (a qube's properties) and admin.property.* (the global ones).

Formats, as Qubes':

- Get: ``default=True|False type=TYPE VALUE`` (TYPE: str, int, bool, vm,
  label; VALUE empty for None; ``default=True type=TYPE `` if unset with no
  default);
- GetAll: one ``NAME default=... type=... VALUE`` line per property, sorted,
  with ``\\`` and newlines escaped as ``\\\\`` and ``\\n``;
- GetDefault: ``type=TYPE VALUE``, or an empty body if there is no default;
- List: one name per line; Help: the property's documentation;
- Set: the new value as the payload (empty for None); Reset: no payload.
"""

from __future__ import annotations

from typing import Any

from ..properties import Property, PropertyHolder
from .registry import Call, method


def _serialize(holder: PropertyHolder, prop: Property) -> str:
    try:
        value = getattr(holder, prop.name)
    except AttributeError:
        return f"default=True type={prop.wire_type} "
    return (f"default={holder.property_is_default(prop.name)} type={prop.wire_type} "
            f"{prop.to_text(value)}")


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
        holder = holder_of(call)
        lines = []
        for prop in holder.property_list():
            text = _serialize(holder, prop).replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"{prop.name} {text}\n")
        return "".join(lines)

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
