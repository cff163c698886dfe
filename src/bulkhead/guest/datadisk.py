"""The qube's end of its data disk: the bulk bytes of qrexec calls, both ways.

dom0 writes a call's bytes into a file the qube sees as a read-only virtio-blk
disk (serial :data:`protocol.DATA_DISK_SERIAL`) and sends a DATA frame naming
the stream, offset and length (see :mod:`protocol`).  We read them with
O_DIRECT when we handle that frame -- never later: dom0 reuses the space once
every frame it sent before a PING has been handled -- and carry on as if the
bytes had come in a STDIN/STDOUT frame.  O_DIRECT keeps the kernel's page cache
out of it: a cached page would be stale the moment dom0 rewrites that place.

The other way (:meth:`DataDisk.fill_out`): on a call this qube makes, its input
is read straight into a page-aligned buffer and written with O_DIRECT into a
chunk of the qube's own area (protocol.DATA_OUT_OFFSET), then named by a DATA
frame; dom0 reads it when it handles the frame.  A chunk is used again once
dom0 credited the bytes in it, or ended the call (a frame it handles after
that is for a finished call, whose input nobody reads).

Imports builtins only, ``mmap`` lazily (the first DATA frame), like the agent.
"""

import os

from . import protocol as P

ALIGN = 512            # virtio-blk's logical block: O_DIRECT's unit of offset and length
# Reads smaller than this go by frame: a disk write costs more than a few KiB on
# virtio-serial (and interactive input comes a few bytes at a time).
MIN_OUT = 4096
F_SETPIPE_SZ = 1031
# DATA runs from this size on are lent in their read buffer rather than copied; at
# most KEEP_BUFS buffers (a MiB each) are kept for reuse.
LEND_MIN = 64 * 1024
KEEP_BUFS = 2


def widen_pipe(fd):
    """Let the pipe ``fd`` hold a whole DATA run (1 MiB): one write and one CREDIT for
    it, not one per 64 KiB (each a turn of the agent's loop under TCG).  Used for a
    child's input and a call's input (qfile-agent widens its own output)."""
    import fcntl  # noqa: PLC0415 -- as mmap above

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, P.DATA_MAX)
    except OSError:
        pass   # a smaller pipe only costs more turns


def _aligned(size):
    """A page-aligned buffer (O_DIRECT wants one) of ``size`` bytes."""
    import mmap  # noqa: PLC0415 -- only a qube that is sent bulk data pays for it

    return mmap.mmap(-1, size)


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
        self.size = 0
        self.writable = False
        self.missing = False          # looked for once and not found: frames only
        self.out_free = []            # chunks of our area nobody uses
        self.out_buf = None
        self.free_bufs = []           # read buffers no input waiting to be written holds

    def open(self):
        path = find_disk()
        if path is None:
            self.missing = True
            raise OSError("no data disk (virtio serial %s)" % P.DATA_DISK_SERIAL)
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            self.writable = True
        except OSError:   # a read-only disk: our input keeps going by frames
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = os.lseek(fd, 0, os.SEEK_END)
        if self.size < P.DATA_DISK_SIZE:
            self.writable = False
        self.out_buf = _aligned(P.DATA_OUT_CHUNK)
        self.out_free = list(range(P.DATA_OUT_CHUNKS))
        self.fd = fd

    # --- our own area: a call's input ------------------------------------------------
    def take_out(self):
        """A free chunk of our area, or None (no disk, none free: use frames)."""
        if self.fd is None and not self.missing:
            try:
                self.open()
            except OSError:
                return None
        if not self.writable or not self.out_free:
            return None
        return self.out_free.pop()

    def free_out(self, chunk):
        self.out_free.append(chunk)

    def fill_out(self, chunk, fd, limit):
        """Read up to ``limit`` bytes of ``fd`` into ``chunk``: (its offset, bytes read).

        The read lands in our aligned buffer, which goes to the disk as whole
        blocks (O_DIRECT); what pads the last block is never named.  A small
        read (interactive input), or one the disk would not take, is not
        written: the offset is None and the caller sends :meth:`out_bytes` in a
        frame.  Raises BlockingIOError if ``fd`` has nothing now, OSError if it
        cannot be read (its end, for the caller)."""
        view = memoryview(self.out_buf)[:min(limit, P.DATA_OUT_CHUNK)]
        try:
            n = os.readv(fd, [view])
        finally:
            view.release()
        if n < MIN_OUT:
            return None, n
        offset = P.DATA_OUT_OFFSET + chunk * P.DATA_OUT_CHUNK
        blocks = -(-n // ALIGN) * ALIGN
        done = 0
        try:
            with memoryview(self.out_buf) as whole:
                while done < blocks:
                    done += os.pwritev(self.fd, [whole[done:blocks]], offset + done)
        except OSError:
            self.writable = False      # frames from now on; these bytes too
            return None, n
        return offset, n

    def out_bytes(self, n):
        """The first ``n`` bytes of the last read (for a small one, sent by frame)."""
        return self.out_buf[:n]

    def read(self, offset, length):
        """The ``length`` bytes at ``offset`` (dom0's numbers: trusted, but checked).

        A big run comes as a view of a read buffer of its own, no copy (100 MB
        copied costs ~0.2 s under TCG): whoever keeps it hands the buffer back
        with :meth:`give_back` once its bytes are used (a buffer not handed back
        is just freed).  A small one comes as bytes, so that a few KiB do not
        hold a MiB."""
        if self.fd is None:
            self.open()
        if offset + length > self.size:
            raise P.ProtocolViolation("DATA beyond the data disk's %d bytes" % self.size)
        start = offset - offset % ALIGN
        end = -(-(offset + length) // ALIGN) * ALIGN
        # Room for a whole DATA run and the partial blocks at either end.
        buf = self.free_bufs.pop() if self.free_bufs else _aligned(P.DATA_MAX + 2 * ALIGN)
        view = memoryview(buf)
        got = 0
        while start + got < offset + length:
            n = os.preadv(self.fd, [view[got:end - start]], start + got)
            if n <= 0:
                raise OSError("short read of the data disk at %d" % (start + got))
            got += n
        data = view[offset - start:offset - start + length]
        if length < LEND_MIN:
            data = bytes(data)
            self.give_back(view)
        return data

    def give_back(self, view):
        """A view :meth:`read` returned is used up: its buffer serves the next read."""
        if len(self.free_bufs) < KEEP_BUFS:
            self.free_bufs.append(view.obj)


class InputQueue:
    """What waits for a child's stdin: frames' bytes (copied) and big DATA runs, left
    in the read buffers they came in (see :meth:`DataDisk.read`) until written."""

    def __init__(self, disk):
        self.disk = disk
        self.parts = []
        self.size = 0

    def __bool__(self):
        return self.size > 0

    def add(self, data):
        if isinstance(data, memoryview):
            self.parts.append(data)
        elif self.parts and isinstance(self.parts[-1], bytearray):
            self.parts[-1] += data
        else:
            self.parts.append(bytearray(data))
        self.size += len(data)

    def write(self, fd):
        """Write as much as ``fd`` takes in one call; returns how much (OSError as os.writev)."""
        n = os.writev(fd, self.parts[:64])
        self.drop(n)
        return n

    def drop(self, n):
        """Forget the first ``n`` bytes (written, or nobody reads them)."""
        self.size -= n
        while n:
            part = self.parts[0]
            if n < len(part):
                if isinstance(part, bytearray):
                    del part[:n]
                else:
                    self.parts[0] = part[n:]
                return
            n -= len(part)
            del self.parts[0]
            if isinstance(part, memoryview):
                self.disk.give_back(part)

    def clear(self):
        self.drop(self.size)
