"""Bulkhead's own Admin API methods for qrexec's ``ask`` (dom0 only):

- ``bulkhead.qrexec.AskList``: the questions waiting for an answer, one a line
  (``ID SOURCE TARGET SERVICE[+ARG] targets=A,B default=C``);
- ``bulkhead.qrexec.AskAnswer+ID``: payload ``allow [TARGET]`` or ``deny``.
"""

from __future__ import annotations

from ..errors import QubesValueError
from .registry import Call, method


def _broker(call: Call):  # type: ignore[no-untyped-def]
    router = getattr(call.app, "qrexec", None)
    if router is None:
        raise QubesValueError("qrexec is not running in this daemon")
    return router.broker


@method("bulkhead.qrexec.AskList", dest="dom0", arg=False)
async def ask_list(call: Call) -> str:
    return "".join(q.describe() + "\n" for q in _broker(call).pending.values())


@method("bulkhead.qrexec.AskAnswer", dest="dom0", arg=True, payload=True)
async def ask_answer(call: Call) -> None:
    qid = call.validate_number(call.arg.encode(), "question id")
    untrusted_words = call.payload_text("answer").split()
    if not untrusted_words or untrusted_words[0] not in ("allow", "deny") or len(untrusted_words) > 2:
        raise QubesValueError("answer 'allow [TARGET]' or 'deny'")
    target = None
    if len(untrusted_words) == 2:
        from ..vm import validate_name

        target = untrusted_words[1]
        validate_name(None, None, target)
    _broker(call).answer(qid, untrusted_words[0] == "allow", target)
