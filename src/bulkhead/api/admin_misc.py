"""admin.label.*, admin.vm.feature.*, admin.vm.tag.*, admin.pool.*."""

from __future__ import annotations

from ..errors import ProtocolError, QubesLabelNotFoundError, QubesValueError
from ..labels import LABELS, Label, get_label
from ..pools import PoolRegistry
from ..vm.base import validate_feature_name, validate_tag
from .registry import Call, method

# --- labels ---------------------------------------------------------------------------


def _label(call: Call) -> Label:
    try:
        return get_label(call.arg)
    except QubesLabelNotFoundError:
        raise QubesValueError(f"Label does not exist: {call.arg}") from None


@method("admin.label.List", dest="dom0", arg=False)
async def label_list(call: Call) -> str:
    return "".join(f"{label.name}\n" for label in LABELS)


@method("admin.label.Get", dest="dom0", arg=True)
async def label_get(call: Call) -> str:
    return _label(call).color


@method("admin.label.Index", dest="dom0", arg=True)
async def label_index(call: Call) -> str:
    return str(_label(call).index)


# --- features -----------------------------------------------------------------------------
# A feature's value is a string, '' meaning false; its name comes in the argument.


@method("admin.vm.feature.List", arg=False)
async def feature_list(call: Call) -> str:
    return "".join(f"{name}\n" for name in call.dest.features)


@method("admin.vm.feature.Get", arg=True)
async def feature_get(call: Call) -> str:
    return call.dest.features[call.arg]


@method("admin.vm.feature.Set", arg=True, payload=None)
async def feature_set(call: Call) -> None:
    name = validate_feature_name(call.arg)
    try:
        value = call.untrusted_payload.decode("ascii", "strict")
    except UnicodeDecodeError:
        raise QubesValueError("A feature value must be ASCII text") from None
    with call.app.transaction():
        call.dest.features[name] = value


@method("admin.vm.feature.Remove", arg=True)
async def feature_remove(call: Call) -> None:
    with call.app.transaction():
        del call.dest.features[call.arg]


@method("admin.vm.feature.CheckWithTemplate", arg=True)
async def feature_check_with_template(call: Call) -> str:
    return call.dest.features.check_with_template(call.arg)


@method("admin.vm.feature.CheckWithAdminVM", arg=True)
async def feature_check_with_adminvm(call: Call) -> str:
    return call.dest.features.check_with_adminvm(call.arg)


@method("admin.vm.feature.CheckWithTemplateAndAdminVM", arg=True)
async def feature_check_with_template_and_adminvm(call: Call) -> str:
    return call.dest.features.check_with_template_and_adminvm(call.arg)


@method("admin.vm.feature.CheckWithNetvm", arg=True)
async def feature_check_with_netvm(call: Call) -> str:
    return call.dest.features.check_with_netvm(call.arg)


# --- tags ---------------------------------------------------------------------------------


@method("admin.vm.tag.List", arg=False)
async def tag_list(call: Call) -> str:
    return "".join(f"{tag}\n" for tag in call.dest.tags)


@method("admin.vm.tag.Get", arg=True)
async def tag_get(call: Call) -> str:
    return "1" if validate_tag(call.arg) in call.dest.tags else "0"


@method("admin.vm.tag.Set", arg=True)
async def tag_set(call: Call) -> None:
    tag = validate_tag(call.arg)
    with call.app.transaction():
        call.dest.tags.add(tag)


@method("admin.vm.tag.Remove", arg=True)
async def tag_remove(call: Call) -> None:
    tag = validate_tag(call.arg)
    with call.app.transaction():
        call.dest.tags.remove(tag)


# --- pools --------------------------------------------------------------------------------


@method("admin.pool.List", dest="dom0", arg=False)
async def pool_list(call: Call) -> str:
    return "".join(f"{name}\n" for name in call.app.pools)


@method("admin.pool.ListDrivers", dest="dom0", arg=False)
async def pool_list_drivers(call: Call) -> str:
    return "".join(f"{driver} {' '.join(parameters)}\n"
                   for driver, parameters in PoolRegistry.drivers().items())


@method("admin.pool.Info", dest="dom0", arg=True)
async def pool_info(call: Call) -> str:
    pool = call.app.pools[call.arg]
    lines = []
    for key, value in pool.info().items():
        text = str(value)
        if "\n" in text or "\n" in key:
            raise ProtocolError("pool information cannot be sent")  # never from our drivers
        lines.append(f"{key}={text}\n")
    return "".join(lines)
