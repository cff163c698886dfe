"""qubes.Filecopy: copying files between qubes (``qvm-copy``), both ends.

The sender (``qfile-agent``, run by ``qvm-copy`` through ``qrexec-client-vm``;
in C, ``guest/c/qfile-agent.c``, as it starts once per copy) writes a stream of
entries; the receiver (this module, the ``qubes.Filecopy`` service in the
target) unpacks them into ``~/QubesIncoming/<source>/`` and answers with one
status line.

The receiver is the trust boundary: the sender is another qube, perhaps a
compromised one.  It accepts only what this format can say and only where it
may go:

- entries are regular files, directories and symlinks; anything else (a
  device, a FIFO) cannot even be written down, and an unknown type ends the
  transfer;
- names are relative, ``/``-separated, UTF-8, without NUL, empty, ``.`` or
  ``..`` components, each component at most 255 bytes, the whole at most
  4096; a name's parent must be a directory made by this same transfer
  (or the incoming folder), opened by file descriptor and never through a
  symlink, so nothing lands outside the folder whatever came before;
- a symlink's target must be relative and stay inside the incoming folder;
- modes keep the permission bits only (no setuid, setgid or sticky);
- nothing is overwritten (``O_EXCL``);
- the total of the data is capped (:data:`DEFAULT_LIMIT`, or the number in
  :data:`LIMIT_FILE`), so an endless stream ends.

The first violation ends the transfer: the receiver says what it refused and
where, keeps what was complete, removes the file it was writing, and exits 1.

Wire format (little endian)::

    MAGIC
    entry:  u8 type (F file, D dir, L symlink, E end) | u16 name length |
            u32 mode | u64 size (file data, or symlink target) | name | data
    end:    b"E" and nothing else

This module imports builtins only (it runs in qubes, started under TCG).
"""

import errno
import os
import sys

MAGIC = b"BHFC1\n"
HEADER = 1 + 2 + 4 + 8
MAX_NAME = 4096
MAX_COMPONENT = 255
CHUNK = 65536
SEND_MAX = 1024 * 1024   # one splice: a pipe's worth (the agent widens our stdin)
DEFAULT_LIMIT = 16 * 1024**3
LIMIT_FILE = "/usr/local/etc/bulkhead/filecopy-limit"
INCOMING = "QubesIncoming"


class Refused(Exception):
    """What the receiver will not take; the message names what and why."""


# --- receiving --------------------------------------------------------------------------

def _copy_some(in_fd, out_fd, n):
    data = os.read(in_fd, n)
    view = memoryview(data)
    while view:
        view = view[os.write(out_fd, view):]
    return len(data)


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        data = os.read(fd, n - len(buf))
        if not data:
            raise Refused("the stream ended in the middle of an entry")
        buf += data
    return bytes(buf)


def check_name(raw):
    """A received name as its components, or Refused."""
    if not raw or len(raw) > MAX_NAME:
        raise Refused("a name of %d bytes" % len(raw))
    if b"\0" in raw:
        raise Refused("a name with a NUL byte")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("a name that is not UTF-8") from None
    if name.startswith("/"):
        raise Refused("an absolute path: %r" % name[:100])
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused("a path with an empty, '.' or '..' component: %r" % name[:100])
        if len(part.encode()) > MAX_COMPONENT:
            raise Refused("a name component over %d bytes" % MAX_COMPONENT)
    return parts


def check_link(parts, raw):
    """A symlink target that stays inside the incoming folder, or Refused."""
    try:
        target = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("a symlink target that is not UTF-8") from None
    if not target or "\0" in target or target.startswith("/"):
        raise Refused("a symlink to an absolute path: %r" % target[:100])
    depth = len(parts) - 1                 # directories above the link, inside the folder
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise Refused("a symlink that leaves the folder: %r" % target[:100])
        elif part not in ("", "."):
            depth += 1
    return target


class Unpacker:
    def __init__(self, root_fd, limit):
        self.dirs = {(): root_fd}          # directories this transfer made, by path
        self.limit = limit
        self.total = 0
        self.count = 0
        self.splice = hasattr(os, "splice")

    def unpack(self, in_fd):
        if _read_exact(in_fd, len(MAGIC)) != MAGIC:
            raise Refused("not a file-copy stream")
        while True:
            kind = _read_exact(in_fd, 1)
            if kind == b"E":
                return
            rest = _read_exact(in_fd, HEADER - 1)
            name_len = int.from_bytes(rest[0:2], "little")
            mode = int.from_bytes(rest[2:6], "little") & 0o777
            size = int.from_bytes(rest[6:14], "little")
            parts = check_name(_read_exact(in_fd, name_len))
            parent = self.dirs.get(tuple(parts[:-1]))
            if parent is None:
                raise Refused("%r: its folder was not sent before it" % "/".join(parts)[:100])
            if kind == b"D":
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=parent)
                os.fchmod(fd, mode | 0o700)
                self.dirs[tuple(parts)] = fd
            elif kind == b"F":
                self._charge(size)
                self._file(in_fd, parent, parts, mode, size)
            elif kind == b"L":
                if size > MAX_NAME:
                    raise Refused("a symlink target of %d bytes" % size)
                target = check_link(parts, _read_exact(in_fd, size))
                os.symlink(target, parts[-1], dir_fd=parent)
            else:
                raise Refused("an entry of unknown type %r (only files, folders and symlinks "
                              "are taken)" % kind)
            self.count += 1

    def _charge(self, size):
        self.total += size
        if self.total > self.limit:
            raise Refused("more than the limit of %d bytes (see %s)" % (self.limit, LIMIT_FILE))

    def _file(self, in_fd, parent, parts, mode, size):
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        try:
            left = size
            while left:
                n = self._move(in_fd, fd, min(SEND_MAX, left))
                if not n:
                    raise Refused("the stream ended in the middle of %r" % "/".join(parts)[:100])
                left -= n
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(parts[-1], dir_fd=parent)   # never leave a partial file behind
            raise
        os.close(fd)

    def _move(self, in_fd, fd, n):
        """Up to ``n`` bytes of the stream into the file ``fd``; 0 at its end.

        From a pipe (as the agent gives us), splice: the kernel copies the pages
        into the file with no turn of the interpreter per CHUNK.  The bytes are
        the sender's, but only as data: where they go was decided above."""
        if self.splice:
            try:
                return os.splice(in_fd, fd, n)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self.splice = False     # not a pipe (a test's file): read and write
        return _copy_some(in_fd, fd, min(n, CHUNK))


def limit():
    try:
        with open(LIMIT_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_LIMIT


def unpacker_main():
    """The qubes.Filecopy service: stdin the stream, stdout one status line."""
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not source or "/" in source or source.startswith("."):
        sys.stdout.write("ERROR: no valid source qube\n")
        return 1
    home = os.path.expanduser("~")
    folder = os.path.join(home, INCOMING, source)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    unpacker = Unpacker(root, limit())
    try:
        unpacker.unpack(0)
    except (Refused, OSError) as e:
        what = "refused %s" % e if isinstance(e, Refused) else "failed: %s" % e
        sys.stderr.write("qubes.Filecopy from %s: %s\n" % (source, what))
        sys.stdout.write("ERROR: %s (after %d entries)\n" % (what, unpacker.count))
        sys.stdout.flush()
        return 1
    sys.stdout.write("OK\n")
    return 0
