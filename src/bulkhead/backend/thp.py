"""Transparent huge pages off for the QEMUs of qubes under TCG.

QEMU asks for huge pages (MADV_HUGEPAGE) on a guest's RAM, so on a host whose
THP setting is ``madvise`` (Debian's) or ``always``, the first page a restore
or the guest writes in any 2 MiB of its RAM costs the host the whole 2 MiB; and
what the guest frees and reports (the balloon's free page reporting) is
discarded 4 KiB at a time, which leaves the huge page resident until the host
is short of memory and splits it.  Measured here on an idle qube restored from
its saved boot: 45 MiB of guest RAM on the host with THP, 35 without.

Under KVM huge pages make the guest's own memory accesses faster (fewer
second-level TLB misses), which is worth their cost; under TCG they gain
nothing, so there we turn them off.  The switch is Linux's per-process
PR_SET_THP_DISABLE: inherited by children and kept across execve, so set in
the daemon around the spawn of a QEMU it reaches QEMU through the jail's
launchers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> int:
    r = _libc.prctl(option, value, 0, 0, 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


@contextlib.contextmanager
def disabled_for_children(enabled: bool = True) -> Iterator[None]:
    """Processes spawned inside this block have THP off (if ``enabled``)."""
    if not enabled:
        yield
        return
    try:
        before = _prctl(PR_GET_THP_DISABLE, 0)
        _prctl(PR_SET_THP_DISABLE, 1)
    except OSError as e:   # an old kernel: the qube only costs more memory
        log.warning("cannot turn transparent huge pages off for QEMU: %s", e)
        yield
        return
    try:
        yield
    finally:
        _prctl(PR_SET_THP_DISABLE, before)
