"""Watching the pools' disks fill up: the role of Qubes' disk-space widget.

Every :data:`INTERVAL` seconds the daemon looks at each pool's filesystem
(``statvfs``, no I/O); when one passes :data:`WARN_FRACTION` it logs a
warning and fires ``pool-usage-warning`` on the app (``admin.Events`` sends
it with an empty subject), once per crossing: the warning is re-armed only
when usage falls below :data:`REARM_FRACTION`.  The state is kept in
:attr:`DiskMonitor.warnings` for ``bulkhead info``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

WARN_FRACTION = 0.90
REARM_FRACTION = 0.88
INTERVAL = 10.0


def pool_space(pool: Any) -> tuple[int, int] | None:
    """(size, usage) in bytes of a pool that sits on a filesystem of its own choosing."""
    space = getattr(pool, "space", None)
    if space is None:
        return None
    size, used, _ = space()
    return (size, used) if size else None


class DiskMonitor:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.warnings: dict[str, float] = {}     # pool name -> usage fraction, while above
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        """Start watching (once, from inside the daemon's event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # noqa: BLE001 -- a monitor must outlive one bad reading
                log.exception("checking the pools' usage failed")
            await asyncio.sleep(INTERVAL)

    def check(self) -> None:
        pools = getattr(self.app, "pools", None)
        if pools is None:
            return
        for name in list(pools):
            try:
                reading = pool_space(pools[name])
            except Exception:  # noqa: BLE001 -- a pool we cannot make is not ours to watch
                continue
            if reading is None:
                continue
            size, used = reading
            fraction = used / size
            if fraction >= WARN_FRACTION and name not in self.warnings:
                self.warnings[name] = fraction
                log.warning("pool %s is %.0f %% full (%d MiB of %d MiB used): qubes that "
                            "write more will be paused", name, fraction * 100,
                            used // 2**20, size // 2**20)
                self.app.fire_event("pool-usage-warning", pool=name, usage=str(used),
                                    size=str(size), percent=f"{fraction * 100:.0f}")
            elif name in self.warnings:
                if fraction < REARM_FRACTION:
                    del self.warnings[name]
                    log.info("pool %s is below %.0f %% full again", name, REARM_FRACTION * 100)
                else:
                    self.warnings[name] = fraction
