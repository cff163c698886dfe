"""The qube's end of its data disk: where dom0 puts the bulk bytes of qrexec calls.

dom0 writes a call's bytes into a file the qube sees as a read-only virtio-blk
disk (serial :data:`protocol.DATA_DISK_SERIAL`) and sends a DATA frame naming
the stream, offset and length (see :mod:`protocol`).  We read them with
O_DIRECT when we handle that frame -- never later: dom0 reuses the space once
every frame it sent before a PING has been handled -- and carry on as if the
bytes had come in a STDIN/STDOUT frame.  O_DIRECT keeps the kernel's page cache
out of it: a cached page would be stale the moment dom0 rewrites that place.

Imports builtins only, ``mmap`` lazily (the first DATA frame), like the agent.
"""

import os

from . import protocol as P

ALIGN = 512            # virtio-blk's logical block: O_DIRECT's unit of offset and length
F_SETPIPE_SZ = 1031


def widen_pipe(fd):
    """Let the pipe ``fd`` hold a whole DATA run (1 MiB): one write and one CREDIT for
    it, not one per 64 KiB (each a turn of the agent's loop under TCG).  Used for a
    child's input, a call's input and the file-copy sender's output."""
    import fcntl  # noqa: PLC0415 -- as mmap above

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, P.DATA_MAX)
    except OSError:
        pass   # a smaller pipe only costs more turns


def find_disk():
    """The /dev node of the disk whose virtio serial is the data disk's, or None."""
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        try:
            with open("/sys/block/%s/serial" % name) as f:
                if f.read().strip() == P.DATA_DISK_SERIAL:
                    return "/dev/" + name
        except OSError:
            continue
    return None


class DataDisk:
    def __init__(self):
        self.fd = None
        self.buf = None
        self.size = 0

    def open(self):
        import mmap  # noqa: PLC0415 -- only a qube that is sent bulk data pays for it

        path = find_disk()
        if path is None:
            raise OSError("no data disk (virtio serial %s)" % P.DATA_DISK_SERIAL)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = os.lseek(fd, 0, os.SEEK_END)
        # Page-aligned (O_DIRECT wants an aligned buffer), room for a whole DATA run
        # and the partial blocks at either end.
        self.buf = mmap.mmap(-1, P.DATA_MAX + 2 * ALIGN)
        self.fd = fd

    def read(self, offset, length):
        """The ``length`` bytes at ``offset`` (dom0's numbers: trusted, but checked)."""
        if self.fd is None:
            self.open()
        if offset + length > self.size:
            raise P.ProtocolViolation("DATA beyond the data disk's %d bytes" % self.size)
        start = offset - offset % ALIGN
        end = -(-(offset + length) // ALIGN) * ALIGN
        view = memoryview(self.buf)
        got = 0
        while start + got < offset + length:
            n = os.preadv(self.fd, [view[got:end - start]], start + got)
            if n <= 0:
                raise OSError("short read of the data disk at %d" % (start + got))
            got += n
        data = bytes(view[offset - start:offset - start + length])
        view.release()
        return data
