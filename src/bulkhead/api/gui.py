"""``bulkhead.vm.gui.Connect``: a qube's GUI port, handed to the user's GUI daemon.

The qube's GUI virtio-serial port is a socket QEMU listens on in the qube's
run directory (root's, 0600, like its agent port).  The desktop user's GUI
daemon (``qvm-start-daemon``, a member of group ``qubes``, which already has
the whole Admin API) asks for it here; the daemon connects and passes the
connected socket itself over the Admin API socket (``SCM_RIGHTS``) after the
usual ``0\\0`` reply, so pixels go straight from QEMU to the GUI daemon and
never through this process.

QEMU serves one connection at a time: a second GUI daemon for the same qube
gets a socket that starts working when the first one closes.  Every check
of what the qube sends is the GUI daemon's (:mod:`bulkhead.gui.validate`).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket

from ..errors import QubesVMError, QubesVMNotRunningError
from .registry import Call, stream

GUI_SOCKET = "gui.sock"
CONNECT_TIMEOUT = 5.0


@stream("bulkhead.vm.gui.Connect", dest="vm", arg=False)
async def gui_connect(call: Call, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    vm = call.dest
    if not vm.is_running():
        raise QubesVMNotRunningError(vm)
    machine = getattr(call.app.lifecycle, "machines", {}).get(vm.name)
    run_dir = getattr(machine, "run_dir", None)
    if run_dir is None or not (run_dir / GUI_SOCKET).exists():
        raise QubesVMError(vm, f"qube {vm.name!r} has no GUI port (started before GUI support?)")
    gui = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        gui.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(gui, str(run_dir / GUI_SOCKET)), CONNECT_TIMEOUT)
        gui.setblocking(True)
        client = writer.get_extra_info("socket")
        # A socket object of our own on the client's descriptor (a dup: the transport keeps its own).
        raw = socket.socket(fileno=os.dup(client.fileno()))
        try:
            # Still non-blocking (the flag is the transport's too): two bytes into an
            # empty socket buffer do not block.
            raw.sendmsg([b"0\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [gui.fileno()]))])
        finally:
            raw.close()
    finally:
        gui.close()
