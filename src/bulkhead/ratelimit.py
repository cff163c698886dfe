"""Rate limits on what a qube can make dom0 do: token buckets, and log lines per qube.

A qube decides how often some things happen in dom0: its agent saying HELLO,
its protocol violations, its link breaking.  Each costs dom0 a little work
and is worth a line in the daemon's log, but a qube that repeats one in a
loop must not keep dom0 busy or fill its disk.

- :class:`TokenBucket`: ``burst`` events at once, then one per
  ``refill_seconds``; the agent link uses one per qube for control messages.
- :func:`qube_log`: every log line a qube can cause goes through it.  A
  burst of :data:`LOG_BURST` lines per qube, then one per
  :data:`LOG_REFILL_SECONDS`; lines over the budget are counted, not
  written, and the next line that passes is preceded by a summary ("N more
  lines caused by this qube were suppressed"), so nothing vanishes without
  a trace.  At most LOG_BURST + 60 / LOG_REFILL_SECONDS lines a minute
  (about 4 KB) per qube, far below the 1 MB a minute a qube may cost the log.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

LOG_BURST = 20
LOG_REFILL_SECONDS = 5.0
# Buckets idle this long are full again, the same as no bucket: forget them so
# that the table does not grow with every qube name ever seen.
FORGET_SECONDS = 600.0


class TokenBucket:
    """``burst`` events at once, refilled at one per ``refill_seconds``."""

    def __init__(self, burst: float, refill_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.refill_seconds = refill_seconds
        self._clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self) -> bool:
        """Spend one token if there is one; False means over the budget."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.refill_seconds)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class QubeLogLimiter:
    """A :class:`TokenBucket` of log lines per qube, with a count of what it held back."""

    def __init__(self, burst: int = LOG_BURST, refill_seconds: float = LOG_REFILL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.refill_seconds = refill_seconds
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, logger: logging.Logger, qube: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` for ``qube`` if its budget allows; returns whether it was written."""
        if not logger.isEnabledFor(level):
            return False
        bucket = self._buckets.get(qube)
        if bucket is None:
            if len(self._buckets) > 1024:
                self._forget_idle()
            bucket = self._buckets[qube] = TokenBucket(self.burst, self.refill_seconds,
                                                       self._clock)
        if not bucket.take():
            self._suppressed[qube] = self._suppressed.get(qube, 0) + 1
            return False
        held = self._suppressed.pop(qube, 0)
        if held:
            logger.log(level, "qube %s: %d more log lines caused by this qube were suppressed "
                       "(at most %d at once, then one per %.0f s)", qube, held, self.burst,
                       self.refill_seconds)
        logger.log(level, msg, *args)
        return True

    def suppressed(self, qube: str) -> int:
        return self._suppressed.get(qube, 0)

    def _forget_idle(self) -> None:
        now = self._clock()
        for name in [n for n, b in self._buckets.items()
                     if now - b.stamp > FORGET_SECONDS and n not in self._suppressed]:
            del self._buckets[name]


#: The daemon's one limiter: every module logging on a qube's behalf shares it,
#: so that a qube has one budget, whatever part of dom0 it pokes.
LIMITER = QubeLogLimiter()


def qube_log(logger: logging.Logger, qube: str, level: int, msg: str, *args: object) -> bool:
    """Log a line caused by ``qube``, within its budget (see the module documentation)."""
    return LIMITER.log(logger, qube, level, msg, *args)
