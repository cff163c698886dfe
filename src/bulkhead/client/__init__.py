"""The Admin API client: what every qvm-* tool (and the Qube Manager) talks to the daemon with.

Modelled on the public shape of Qubes' ``qubesadmin``::

    app = App(Connection())            # $BULKHEAD_SOCKET, default /run/qubesd.sock
    work = app.domains["work"]
    work.netvm                         # -> VM sys-firewall (admin.vm.property.Get+netvm)
    work.start()                       # admin.vm.Start
    work.run_stream("ls /", stdout=sys.stdout.buffer)   # bulkhead.vm.Run

Modules: :mod:`.wire` (the byte format), :mod:`.connection` (the socket),
:mod:`.holder` (typed properties), :mod:`.vm`, :mod:`.storage`,
:mod:`.collections`, :mod:`.app`, :mod:`.run` (the qvm-run stream),
:mod:`.power` (waiting for qubes to halt), :mod:`.toolparser` and
:mod:`.table` (shared by the tools).
"""

from typing import Any

from .app import App
from .collections import Label
from .connection import Connection, EventStream
from .holder import DEFAULT
from .storage import Pool, Volume
from .vm import VM, RunResult
from .wire import Event

__all__ = ["App", "Connection", "EventStream", "Event", "VM", "Volume", "Pool", "Label",
           "RunError", "RunResult", "DEFAULT"]


def __getattr__(name: str) -> Any:
    # RunError lives in .run, which only qvm-run needs: the other tools do not import it.
    if name == "RunError":
        from .run import RunError
        return RunError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
