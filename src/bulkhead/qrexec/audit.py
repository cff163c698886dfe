"""The qrexec audit log: every call a qube asks for, and what decided it.

One line a call (:func:`bulkhead.qrexec.policy.audit_line`: time, verdict,
source, target as asked, service and argument, the target it resolved to,
the policy line that decided, and for ``ask`` the user's answer) in
``$BULKHEAD_HOME/log/qrexec.log``, rotated by size like the daemon's log, so
a qube that calls in a loop cannot fill dom0's disk.  ``bulkhead policy log``
shows it.
"""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from typing import TYPE_CHECKING, Any

from .policy import audit_line, audit_log_of

if TYPE_CHECKING:  # pragma: no cover
    from .policy import Decision

MAX_BYTES = 16 * 1024 * 1024
BACKUPS = 3

_logger = logging.getLogger("bulkhead.qrexec.audit")
_logger.propagate = False
_opened: str | None = None


def _ensure_handler(app: Any) -> None:
    global _opened
    paths = getattr(app, "paths", None)
    if paths is None:
        return
    path = audit_log_of(paths.home)
    if _opened == str(path):
        return
    for h in list(_logger.handlers):
        _logger.removeHandler(h)
        h.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    _opened = str(path)


def record(app: Any, source: str, target: str, service: str, argument: str,
           decision: "Decision", answer: str | None | bool = False) -> str:
    """Write one line for a call (with ``answer``: what the user said to an ``ask``)."""
    line = audit_line(decision, service, argument, source, target)
    if answer is not False:
        line += f" answer={answer or 'deny'}"
    _ensure_handler(app)
    _logger.info("%s", line)
    return line
