"""admin.policy.*: the qrexec policy files, through the Admin API.

Qubes manages its policy with the ``policy.List``/``Get``/``Replace``/``Remove``
services (and ``policy.include.*`` for ``policy.d/include``); Bulkhead serves
the same operations, with the same argument and payload formats, as dom0
methods of its Admin API (see :mod:`bulkhead.qrexec.policy_write`):

- ``admin.policy.List``: one name per line (without ``.policy``);
- ``admin.policy.Get+NAME``: ``sha256:HEX\\n`` then the content;
- ``admin.policy.Replace+NAME``: payload ``TOKEN\\n`` then the content;
- ``admin.policy.Remove+NAME``: payload ``TOKEN``.

TOKEN is ``any``, ``new`` or the ``sha256:`` token a Get returned.  A change
that would add an error to the policy is refused, and after a change the
daemon's engine reloads at once.
"""

from __future__ import annotations

from ..errors import QubesException, QubesValueError
from ..qrexec.policy import PolicyEngine, engine_for
from ..qrexec.policy_write import MAX_CONTENT, PolicyFiles, PolicyWriteError
from .registry import Call, method

#: Replace's payload: the token line, then at most MAX_CONTENT of policy
MAX_PAYLOAD = MAX_CONTENT + 128


def _engine(call: Call) -> PolicyEngine:
    try:
        return engine_for(call.app)
    except LookupError:
        raise QubesException("This Bulkhead instance has no policy directory") from None


def _files(call: Call, include: bool) -> PolicyFiles:
    return PolicyFiles(_engine(call).policy_dir, include=include)


def _register(prefix: str, include: bool) -> None:
    """The four methods for policy files (``admin.policy.``) or included files."""

    @method(prefix + "List", dest="dom0", arg=False)
    async def policy_list(call: Call) -> str:
        return "".join(f"{name}\n" for name in _files(call, include).list())

    @method(prefix + "Get", dest="dom0", arg=True)
    async def policy_get(call: Call) -> bytes:
        try:
            return _files(call, include).get(call.arg)
        except PolicyWriteError as e:
            raise QubesValueError(str(e)) from None

    @method(prefix + "Replace", dest="dom0", arg=True, payload=True, max_payload=MAX_PAYLOAD)
    async def policy_replace(call: Call) -> None:
        try:
            _files(call, include).replace(call.arg, call.untrusted_payload)
        except PolicyWriteError as e:
            raise QubesValueError(str(e)) from None
        _engine(call).reload()

    @method(prefix + "Remove", dest="dom0", arg=True, payload=True)
    async def policy_remove(call: Call) -> None:
        try:
            _files(call, include).remove(call.arg, call.untrusted_payload)
        except PolicyWriteError as e:
            raise QubesValueError(str(e)) from None
        _engine(call).reload()


_register("admin.policy.", include=False)
_register("admin.policy.include.", include=True)
