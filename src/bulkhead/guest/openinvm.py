"""qubes.OpenInVM: open a file in another qube (often a fresh disposable), both ends.

``qvm-open-in-vm TARGET FILE`` (``qvm-open-in-dvm FILE`` is TARGET ``@dispvm``)
sends the file's name and content; the service in the target saves it in a
new private folder, opens it with the qube's program for files and waits
for that program to end; if the file changed there it sends the new content
back, and the caller replaces its file with it -- unless ``--view-only``,
which sends nothing back (Qubes' semantics).

The program that opens files is the first of ``/usr/local/bin/qubes-open``
(the user's own choice, kept on ``/rw``), ``xdg-open`` and ``mimeopen -n``
that the qube has.

Both ends treat the other as hostile: the name must be one plain file name
(no ``/``, NUL, ``.``/``..``, at most 255 bytes), the content is capped at
:data:`MAX_SIZE` bytes, and the caller writes what comes back to a new file
beside the original and renames it over, so a failure never leaves half a
file.  Wire format: ``MAGIC``, a u16 name length and the name, a u64 size and
the content; back: ``U`` (unchanged, or view-only) or ``C`` + u64 size + the
new content.
"""

import os
import sys
import tempfile

MAGIC = b"BHOPEN1\n"
MAX_SIZE = 4 * 1024**3
OPENERS = (("/usr/local/bin/qubes-open",), ("xdg-open",), ("mimeopen", "-n"))
CHUNK = 65536


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        data = os.read(fd, min(CHUNK, n - len(buf)))
        if not data:
            raise ValueError("the stream ended early")
        buf += data
    return bytes(buf)


def _copy(src_fd, dst_fd, size):
    left = size
    while left:
        data = os.read(src_fd, min(CHUNK, left))
        if not data:
            raise ValueError("the stream ended early")
        os.write(dst_fd, data)
        left -= len(data)


def check_name(raw):
    if not raw or len(raw) > 255 or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise ValueError("not a plain file name: %r" % raw[:64])
    return raw.decode("utf-8", "surrogateescape")


# --- the caller -------------------------------------------------------------------------

def sender_main(argv):
    """qopen-in-vm [--view-only] FILE: stdout to the service, stdin its answer."""
    view_only = bool(argv) and argv[0] == "--view-only"
    args = argv[1:] if view_only else argv
    if len(args) != 1:
        sys.stderr.write("usage: qopen-in-vm [--view-only] FILE\n")
        return 2
    path = args[0]
    name = os.path.basename(path).encode("utf-8", "surrogateescape")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            os.write(1, MAGIC + len(name).to_bytes(2, "little") + name + size.to_bytes(8, "little"))
            _copy(f.fileno(), 1, size)
        os.close(1)
        kind = os.read(0, 1)
        if kind == b"C":
            new_size = int.from_bytes(_read_exact(0, 8), "little")
            if new_size > MAX_SIZE:
                raise ValueError("the changed file is over %d bytes" % MAX_SIZE)
            if view_only:
                return 0
            tmp = path + ".qubes-new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                _copy(0, fd, new_size)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
            sys.stderr.write("qvm-open-in-vm: %s was changed in the other qube; saved\n" % path)
        elif kind != b"U":
            sys.stderr.write("qvm-open-in-vm: the other qube did not open the file\n")
            return 1
    except (OSError, ValueError) as e:
        sys.stderr.write("qvm-open-in-vm: %s\n" % e)
        return 1
    return 0


# --- the service ----------------------------------------------------------------------------

def opener():
    for argv in OPENERS:
        prog = argv[0]
        if os.path.isabs(prog):
            if os.access(prog, os.X_OK):
                return list(argv)
            continue
        for d in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
            if os.access(os.path.join(d, prog), os.X_OK):
                return list(argv)
    return None


def service_main():
    """qubes.OpenInVM: stdin the file, stdout the answer."""
    try:
        if _read_exact(0, len(MAGIC)) != MAGIC:
            raise ValueError("not an open-in-vm stream")
        name = check_name(_read_exact(0, int.from_bytes(_read_exact(0, 2), "little")))
        size = int.from_bytes(_read_exact(0, 8), "little")
        if size > MAX_SIZE:
            raise ValueError("a file of %d bytes (at most %d)" % (size, MAX_SIZE))
        folder = tempfile.mkdtemp(prefix="qubes-open-")
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _copy(0, fd, size)
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        sys.stderr.write("qubes.OpenInVM: refused: %s\n" % e)
        return 1
    before = os.stat(path)
    with open(path, "rb") as f:
        original = f.read() if size <= 64 * 1024 * 1024 else None
    argv = opener()
    if argv is None:
        sys.stderr.write("qubes.OpenInVM: no program to open files here (install one, or "
                         "make /usr/local/bin/qubes-open)\n")
        return 1
    pid = os.fork()
    if pid == 0:
        fd = os.open("/dev/null", os.O_RDONLY)
        os.dup2(fd, 0)
        os.dup2(2, 1)   # the program's output is not part of the answer
        try:
            os.execvp(argv[0], argv + [path])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)
    after = os.stat(path)
    with open(path, "rb") as f:
        changed = (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size) \
            if original is None else f.read() != original
    if not changed:
        os.write(1, b"U")
        return 0
    with open(path, "rb") as f:
        new_size = os.fstat(f.fileno()).st_size
        os.write(1, b"C" + new_size.to_bytes(8, "little"))
        _copy(f.fileno(), 1, new_size)
    return 0
