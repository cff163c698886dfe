"""``ask``: the user decides whether a qrexec call goes ahead, and to which qube.

The broker holds each pending question for :data:`ASK_TIMEOUT` seconds; no
answer in time means deny.  Who answers is pluggable:

- the Admin API (``bulkhead.qrexec.AskList``, ``bulkhead.qrexec.AskAnswer``),
  announced on dom0 by the ``qrexec-ask`` event of ``admin.Events`` -- the
  non-interactive answer tests and tools use, and what a GUI prompt will use;
- a terminal prompt, when the daemon runs in the foreground on a terminal
  (``bulkhead daemon`` without ``--detach``).

An answer names a qube among those the policy line offers (its ``target=`` or
the ``ask`` targets; the default target if none is named); anything else is
refused with a clear error and the question stays open.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import QubesValueError

if TYPE_CHECKING:  # pragma: no cover
    from .policy import Decision

log = logging.getLogger(__name__)

ASK_TIMEOUT = 60.0
MAX_PENDING = 64


@dataclass
class Question:
    id: int
    source: str
    target: str
    service: str
    argument: str
    targets: list[str]
    default_target: str | None
    answer: "asyncio.Future[str | None]" = field(repr=False)

    def describe(self) -> str:
        full = self.service + (f"+{self.argument}" if self.argument else "")
        return (f"{self.id} {self.source} {self.target} {full} "
                f"targets={','.join(self.targets)} default={self.default_target or ''}")


class AskBroker:
    def __init__(self, app: Any, timeout: float = ASK_TIMEOUT, terminal: bool | None = None) -> None:
        self.app = app
        self.timeout = timeout
        self.pending: dict[int, Question] = {}
        self._ids = itertools.count(1)
        if terminal is None:
            terminal = os.environ.get("BULKHEAD_ASK_TERMINAL", "") == "1" and sys.stdin.isatty()
        self.terminal = terminal

    async def ask(self, source: str, target: str, service: str, argument: str,
                  decision: "Decision") -> str | None:
        """The qube the user allows the call to, or None (denied, or no answer in time)."""
        if len(self.pending) >= MAX_PENDING:
            log.warning("qrexec ask from %s refused: %d questions pending", source, MAX_PENDING)
            return None
        targets = list(decision.ask_targets) or ([decision.target] if decision.target else [])
        q = Question(next(self._ids), source, target, service, argument, targets,
                     decision.default_target, asyncio.get_running_loop().create_future())
        self.pending[q.id] = q
        try:
            self._announce(q)
            if self.terminal:
                asyncio.ensure_future(self._terminal_prompt(q))
            return await asyncio.wait_for(asyncio.shield(q.answer), self.timeout)
        except asyncio.TimeoutError:
            log.info("qrexec ask %d (%s -> %s %s) not answered in %.0f s: denied",
                     q.id, source, target, service, self.timeout)
            return None
        finally:
            del self.pending[q.id]

    def answer(self, qid: int, allow: bool, target: str | None = None) -> None:
        q = self.pending.get(qid)
        if q is None or q.answer.done():
            raise QubesValueError(f"no qrexec question {qid} is pending")
        if not allow:
            q.answer.set_result(None)
            return
        chosen = target or q.default_target or (q.targets[0] if len(q.targets) == 1 else None)
        if chosen is None:
            raise QubesValueError(f"question {qid}: name the target, one of {', '.join(q.targets)}")
        if q.targets and chosen not in q.targets and chosen != q.default_target:
            raise QubesValueError(f"question {qid}: {chosen!r} is not among the targets the "
                                  f"policy offers ({', '.join(q.targets)})")
        q.answer.set_result(chosen)

    def _announce(self, q: Question) -> None:
        dom0 = self.app.domains.get("dom0") if hasattr(self.app, "domains") else None
        if dom0 is not None:
            dom0.fire_event("qrexec-ask", id=str(q.id), source=q.source, target=q.target,
                            service=q.service, argument=q.argument)

    async def _terminal_prompt(self, q: Question) -> None:
        prompt = (f"\nqrexec: {q.source} asks to call {q.service}"
                  f"{'+' + q.argument if q.argument else ''} in {q.target}; allow to "
                  f"[{'/'.join(q.targets)}] (empty: deny)? ")
        reply = await asyncio.get_running_loop().run_in_executor(None, _read_line, prompt)
        if q.id in self.pending and not q.answer.done():
            try:
                self.answer(q.id, bool(reply), reply or None)
            except QubesValueError as e:
                print(e, file=sys.stderr)


def _read_line(prompt: str) -> str:
    try:
        return input(prompt).strip()
    except EOFError:
        return ""
