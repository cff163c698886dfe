"""MIT-SHM for python-xlib, which lacks it: a System V segment through ctypes and the
two requests the GUI agent uses (ShmAttach, ShmGetImage).

ShmGetImage of an 800x600 window takes 6 ms under TCG, a plain GetImage 99 ms
(FACTS.md, GUI).  Builtins and python-xlib only: it runs in the qube.
"""

import ctypes
import ctypes.util

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


class ShmSegment:
    def __init__(self, size):
        self.size = size
        self.shmid = _libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
        if self.shmid < 0:
            raise OSError(ctypes.get_errno(), "shmget")
        addr = _libc.shmat(self.shmid, None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "shmat")
        self.addr = addr

    def remove(self):
        # Marked for removal: it goes when the X server and we detach (or exit).
        _libc.shmctl(self.shmid, IPC_RMID, None)

    def read(self, n):
        return ctypes.string_at(self.addr, n)

    def detach(self):
        _libc.shmdt(ctypes.c_void_p(self.addr))


def requests():
    """(ShmAttach, ShmGetImage), declared once python-xlib is imported."""
    from Xlib.protocol import rq  # noqa: PLC0415

    class _ShmAttach(rq.Request):
        _request = rq.Struct(rq.Card8("opcode"), rq.Opcode(1), rq.RequestLength(),
                             rq.Card32("shmseg"), rq.Card32("shmid"), rq.Bool("read_only"),
                             rq.Pad(3))

    class _ShmGetImage(rq.ReplyRequest):
        _request = rq.Struct(rq.Card8("opcode"), rq.Opcode(4), rq.RequestLength(),
                             rq.Drawable("drawable"), rq.Int16("x"), rq.Int16("y"),
                             rq.Card16("width"), rq.Card16("height"), rq.Card32("plane_mask"),
                             rq.Card8("format"), rq.Pad(3), rq.Card32("shmseg"), rq.Card32("offset"))
        _reply = rq.Struct(rq.ReplyCode(), rq.Card8("depth"), rq.Card16("sequence_number"),
                           rq.ReplyLength(), rq.Card32("visual"), rq.Card32("size"), rq.Pad(16))
    return _ShmAttach, _ShmGetImage
