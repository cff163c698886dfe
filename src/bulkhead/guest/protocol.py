"""The guest-agent protocol: framed, versioned, length-limited.

This one module is used on both ends: dom0 imports it as
``bulkhead.guest.protocol``; the template build installs this directory into
the guest as the package ``bulkhead_guest``.  It therefore imports nothing but
builtins (under TCG every import costs the guest's start-up time).

Wire format.  Every message is a 12-byte header then ``length`` bytes::

    u16 type | u16 flags (0) | u32 channel | u32 length      (little endian)

- ``length`` is at most :data:`MAX_PAYLOAD`; a bigger one is a protocol
  violation: dom0 closes the link and logs it.
- Channel 0 is the control channel (HELLO, PING, SHUTDOWN).  Every other
  channel is one call.  dom0 numbers the calls it opens (a command or a
  qrexec service to run in the qube: EXEC, SERVICE) below 2**31; the guest
  numbers the calls it opens (a qrexec call to another qube: CALL) with
  :data:`GUEST_CHANNEL` set.  On a guest's channel the roles are turned
  round: the guest sends STDIN, dom0 sends STDOUT, STDERR, ERROR and EXIT.
- ``HELLO`` carries the protocol version; the guest sends it when it opens its
  port, dom0 answers with its own.  A different major version closes the link.
- Data flows with credit: each side may have at most :data:`WINDOW` bytes of a
  channel's data in flight; the receiver returns ``CREDIT`` as it consumes.
  So one slow reader never stalls the shared link, and nobody buffers without
  bound.

The same framing, on channel 1, carries ``bulkhead.vm.Run`` between the
qvm-run client and the daemon (see :mod:`bulkhead.api.run`).
"""

VERSION = 1
HEADER_SIZE = 12
MAX_PAYLOAD = 65536
WINDOW = 256 * 1024
MAX_USER = 32
MAX_COMMAND = 60000
MAX_CHANNELS = 256

# Message types.  Direction: d = dom0 -> guest, g = guest -> dom0.
HELLO = 1          # d,g  u32 version
EXEC = 2           # d    b"user\0command": run ``command`` with /bin/sh -c as ``user``
STDIN = 3          # d    data; empty payload = end of input
STDOUT = 4         # g    data; empty payload = end of output
STDERR = 5         # g    data; empty payload = end of output
EXIT = 6           # g    i32 exit code; the channel is over
CREDIT = 7         # d,g  u32 bytes consumed
SIGNAL = 8         # d    u32 signal number, sent to the call's process group
SHUTDOWN = 9       # d    channel 0: power off the qube
PING = 10          # d    channel 0: up to 64 bytes, echoed by PONG
PONG = 11          # g
ERROR = 12         # g    UTF-8 message: the call could not start; an EXIT follows
SERVICE = 13       # d    b"user\0service+argument\0source-qube": run a qrexec service
CALL = 14          # g    b"target\0service+argument": call a qrexec service in another qube
RESUME = 15        # d    a restored qube's own part of the boot (see :func:`pack_resume`)
DATA = 16          # d,g  u32 stream type | u32 offset | u32 length: that stream's next bytes
                   #      are on the qube's data disk at offset (see :func:`split_data`);
                   #      from the guest only on its own calls (their input)

GUEST_CHANNEL = 0x80000000   # set in the numbers of the channels the guest opens

NAMES = {
    HELLO: "HELLO", EXEC: "EXEC", STDIN: "STDIN", STDOUT: "STDOUT", STDERR: "STDERR",
    EXIT: "EXIT", CREDIT: "CREDIT", SIGNAL: "SIGNAL", SHUTDOWN: "SHUTDOWN",
    PING: "PING", PONG: "PONG", ERROR: "ERROR", SERVICE: "SERVICE", CALL: "CALL",
    RESUME: "RESUME", DATA: "DATA",
}
MAX_TARGET = 64

# The largest payload each type may carry (a tighter bound than MAX_PAYLOAD).
PAYLOAD_LIMIT = {
    HELLO: 4, EXEC: MAX_USER + 1 + MAX_COMMAND, STDIN: MAX_PAYLOAD, STDOUT: MAX_PAYLOAD,
    STDERR: MAX_PAYLOAD, EXIT: 4, CREDIT: 4, SIGNAL: 4, SHUTDOWN: 0, PING: 64, PONG: 64,
    ERROR: 1024, SERVICE: MAX_USER + 1 + 256 + 1 + 32, CALL: MAX_TARGET + 1 + 256,
    RESUME: 64 + 512, DATA: 12,
}

CONTROL_ONLY = frozenset({HELLO, SHUTDOWN, PING, PONG})
# Who may send what, on whose channels: (on dom0's channels, on the guest's channels).
_GUEST_SENDS = (frozenset({STDOUT, STDERR, EXIT, CREDIT, ERROR}), frozenset({CALL, STDIN, CREDIT, DATA}))
_DOM0_SENDS = (frozenset({EXEC, SERVICE, RESUME, STDIN, CREDIT, SIGNAL, DATA}),
               frozenset({STDOUT, STDERR, EXIT, CREDIT, ERROR, DATA}))
FROM_GUEST = frozenset({HELLO, PONG}) | _GUEST_SENDS[0] | _GUEST_SENDS[1]
FROM_DOM0 = frozenset({HELLO, SHUTDOWN, PING}) | _DOM0_SENDS[0] | _DOM0_SENDS[1]
_CHANNEL_RULES = {FROM_GUEST: _GUEST_SENDS, FROM_DOM0: _DOM0_SENDS}


class ProtocolViolation(Exception):
    """The peer sent something this protocol does not allow; the link must be closed."""


def pack(mtype, chan, payload=b""):
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (n, MAX_PAYLOAD))
    return (mtype.to_bytes(2, "little") + b"\0\0" + chan.to_bytes(4, "little")
            + n.to_bytes(4, "little") + payload)


def u32(value):
    return int(value).to_bytes(4, "little")


def i32(value):
    return int(value).to_bytes(4, "little", signed=True)


def parse_u32(payload):
    if len(payload) != 4:
        raise ProtocolViolation("expected a 4-byte integer, got %d bytes" % len(payload))
    return int.from_bytes(payload, "little")


def parse_i32(payload):
    if len(payload) != 4:
        raise ProtocolViolation("expected a 4-byte integer, got %d bytes" % len(payload))
    return int.from_bytes(payload, "little", signed=True)


def parse_header(header, allowed):
    """Check a 12-byte header against the types ``allowed`` from this peer.

    Returns ``(type, channel, length)``; raises ProtocolViolation otherwise.
    """
    mtype = int.from_bytes(header[0:2], "little")
    flags = int.from_bytes(header[2:4], "little")
    chan = int.from_bytes(header[4:8], "little")
    length = int.from_bytes(header[8:12], "little")
    if mtype not in allowed:
        raise ProtocolViolation("unexpected message type %d" % mtype)
    if flags != 0:
        raise ProtocolViolation("nonzero flags %#x in %s" % (flags, NAMES[mtype]))
    if length > PAYLOAD_LIMIT[mtype]:
        raise ProtocolViolation("%s payload of %d bytes exceeds its limit of %d"
                                % (NAMES[mtype], length, PAYLOAD_LIMIT[mtype]))
    if (mtype in CONTROL_ONLY) != (chan == 0):
        raise ProtocolViolation("%s on channel %d" % (NAMES[mtype], chan))
    rules = _CHANNEL_RULES.get(allowed)
    if rules is not None and chan != 0:
        if mtype not in rules[1 if chan & GUEST_CHANNEL else 0]:
            raise ProtocolViolation("%s on %s channel %d" % (
                NAMES[mtype], "a guest" if chan & GUEST_CHANNEL else "a dom0", chan))
    return mtype, chan, length


class FrameReader:
    """Incremental, bounded frame parser: feed bytes, take complete frames.

    Never holds more than one header plus one maximal payload, so a peer that
    sends a flood cannot make the receiver buffer without bound.
    """

    def __init__(self, allowed):
        self.allowed = allowed
        self._buf = bytearray()
        self._want = None  # (type, chan, length) of the frame being read

    def feed(self, data):
        """Add bytes; returns the list of complete ``(type, chan, payload)`` frames."""
        self._buf += data
        frames = []
        while True:
            if self._want is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                self._want = parse_header(bytes(self._buf[:HEADER_SIZE]), self.allowed)
                del self._buf[:HEADER_SIZE]
            mtype, chan, length = self._want
            if len(self._buf) < length:
                break
            payload = bytes(self._buf[:length])
            del self._buf[:length]
            self._want = None
            frames.append((mtype, chan, payload))
        return frames

    @property
    def mid_frame(self):
        """True if a frame has begun but not ended (EOF now means a truncated frame)."""
        return self._want is not None or len(self._buf) > 0


# --- DATA: bulk bytes on the qube's data disk ------------------------------------------
# Under TCG, host->guest virtio-serial moves ~19 MB/s while a guest reads a virtio-blk
# disk with O_DIRECT at GB/s; the other way a 32 KiB virtio-serial write costs the
# guest a copy, an allocation and a notification, where an O_DIRECT write of a MiB
# to a disk costs it one request.  So a qube has a data disk (serial
# :data:`DATA_DISK_SERIAL`), a file of dom0's, in two areas:
# - dom0's (the first :data:`DATA_IN_SIZE` bytes): dom0 writes a call's bulk input
#   (or, on a call the qube made, the service's output) there and sends DATA, which
#   says where; the qube reads the bytes when it handles the frame.
# - the qube's (:data:`DATA_OUT_CHUNKS` chunks of :data:`DATA_OUT_CHUNK` bytes from
#   :data:`DATA_OUT_OFFSET`): on a call it made, the qube writes its input there and
#   sends DATA; dom0 reads the bytes when it handles the frame, and only inside that
#   area.  The qube reuses a chunk once dom0 credited its bytes or ended the call.
# Either way the bytes count against the call's credit as the same bytes in a
# STDIN/STDOUT frame would.  A qube that writes into dom0's area spoils only its own
# input; what dom0 reads from the qube's area is data, as a frame's bytes are.
DATA_DISK_SERIAL = "qrexec-data"
#: the largest run of bytes one DATA frame names
DATA_MAX = 1024 * 1024
DATA_IN_SIZE = 16 * DATA_MAX
# A chunk is a DATA run's worth: 100 MB of a call's input then cost the qube ~100
# disk writes, frames and turns of its agent's loop rather than ~400 with 256 KiB
# chunks (a 100 MB qvm-copy took 2.3-2.5 s instead of 2.9-3.5 s, measured in turn;
# the sender's CPU time fell from 2.5-3.2 s to 1.8 s).  A call holds at most
# WINDOW + GRANT_MAX (a chunk) uncredited, so it never needs more than 3 of them.
DATA_OUT_CHUNK = 1024 * 1024
DATA_OUT_CHUNKS = 4
DATA_OUT_OFFSET = DATA_IN_SIZE
DATA_DISK_SIZE = DATA_IN_SIZE + DATA_OUT_CHUNKS * DATA_OUT_CHUNK
#: the most dom0 adds to a call's window (CREDIT for bytes not yet sent: its relay's
#: grant, so that a qube sends a DATA run ahead); a qube that reuses a chunk only once
#: the credit it got exceeds the chunk's end by this much knows dom0 has read it
GRANT_MAX = DATA_MAX - WINDOW


def pack_data(mtype, offset, length):
    return u32(mtype) + u32(offset) + u32(length)


def split_data(payload, allowed):
    """DATA's payload -> (stream type, offset, length); the type must be in ``allowed``."""
    if len(payload) != 12:
        raise ProtocolViolation("DATA payload of %d bytes" % len(payload))
    mtype, offset, length = (int.from_bytes(payload[i:i + 4], "little") for i in (0, 4, 8))
    if mtype not in allowed or not 0 < length <= DATA_MAX:
        raise ProtocolViolation("DATA for stream %d of %d bytes" % (mtype, length))
    return mtype, offset, length


def split_exec(payload):
    """``b"user\\0command"`` -> (user, command) as str; raises ProtocolViolation."""
    user, sep, command = payload.partition(b"\0")
    if not sep or not user or len(user) > MAX_USER or not command:
        raise ProtocolViolation("EXEC payload must be user\\0command")
    try:
        return user.decode("ascii"), command.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("EXEC payload is not valid text") from None


def valid_service_name(name):
    """qrexec service names: ``Service.Name`` then optional ``+argument``, from a narrow alphabet."""
    if not name or len(name) > 256 or name[0] in ".+-":
        return False
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "._-+")):
            return False
    # The first "+" starts the argument, which may hold more (qubes.VMExec separates words so).
    return ".." not in name and "/" not in name


def valid_call_target(name):
    """A qrexec call's target as the caller names it: a qube name, ``@default``,
    ``@adminvm``, ``@dispvm`` or ``@dispvm:NAME`` (the policy decides what it means)."""
    if name in ("@default", "@adminvm", "@dispvm"):
        return True
    if name.startswith("@dispvm:"):
        name = name[len("@dispvm:"):]
    if not name or len(name) > 31 or not (name[0].isascii() and name[0].isalpha()):
        return False
    return all(ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in name)


def split_call(payload):
    """``b"target\0service+arg"`` -> (target, service); raises ProtocolViolation."""
    target, sep, service = payload.partition(b"\0")
    try:
        target, service = target.decode("ascii"), service.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolViolation("CALL payload is not ASCII") from None
    if not sep or not valid_call_target(target):
        raise ProtocolViolation("CALL payload must be target\\0service; bad target %r" % target[:64])
    if not valid_service_name(service):
        raise ProtocolViolation("invalid service name %r" % service[:64])
    return target, service


def split_service(payload):
    """``b"user\\0service+arg\\0source"`` -> (user, service, source); raises ProtocolViolation."""
    parts = payload.split(b"\0")
    if len(parts) != 3 or not parts[0] or len(parts[0]) > MAX_USER:
        raise ProtocolViolation("SERVICE payload must be user\\0service\\0source")
    try:
        user, service, source = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError:
        raise ProtocolViolation("SERVICE payload is not ASCII") from None
    if not valid_service_name(service):
        raise ProtocolViolation("invalid service name %r" % service[:64])
    return user, service, source


# --- RESUME: a qube restored from a saved boot state finishes its own boot -------------
# The saved state was taken before any per-qube volume was read, under a neutral
# name.  The restored guest must (1) reseed its kernel's RNG with dom0's fresh bytes
# before anything else runs, (2) forget what its kernel learnt about the
# placeholder disks it booted with (capacity, cached sectors), then (3) run the
# qube's own part of the boot (name, private volume, services): a call whose
# output and exit code dom0 reads like any other.
SEED_BYTES = 64


def pack_resume(seed, name, resize_private, disk_sectors, macs=None):
    """dom0's RESUME payload: 64 random bytes, then ``name\0resize\0vdb=N,vdc=M\0macs``
    where ``macs`` is ``SAVED=OWN,...``: each network device's MAC in the saved boot
    and the one this qube's device has."""
    if len(seed) != SEED_BYTES:
        raise ValueError("the seed must be %d bytes" % SEED_BYTES)
    disks = ",".join("%s=%d" % (d, n) for d, n in sorted(disk_sectors.items()))
    pairs = ",".join("%s=%s" % (a, b) for a, b in sorted((macs or {}).items()))
    return seed + b"\0".join([name.encode("ascii"), b"1" if resize_private else b"0",
                              disks.encode("ascii"), pairs.encode("ascii")])


def valid_mac(text):
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdef" for c in p)
                                   for p in parts)


def split_resume(payload):
    """-> (seed, name, resize_private, {disk: sectors}, {saved MAC: own MAC});
    raises ProtocolViolation."""
    seed, rest = payload[:SEED_BYTES], payload[SEED_BYTES:]
    parts = rest.split(b"\0")
    if len(seed) != SEED_BYTES or len(parts) != 4:
        raise ProtocolViolation("RESUME payload must be seed, name\0resize\0disks\0macs")
    try:
        name, resize, disks, pairs = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError:
        raise ProtocolViolation("RESUME payload is not ASCII") from None
    macs = {}
    for item in filter(None, pairs.split(",")):
        saved, sep, own = item.partition("=")
        if not sep or not valid_mac(saved) or not valid_mac(own):
            raise ProtocolViolation("RESUME: bad MAC pair %r" % item[:40])
        macs[saved] = own
    if not valid_call_target(name) or name.startswith("@") or resize not in ("0", "1"):
        raise ProtocolViolation("RESUME: bad name or flag")
    sizes = {}
    for item in filter(None, disks.split(",")):
        disk, sep, n = item.partition("=")
        if not sep or disk not in ("vdb", "vdc") or not n.isdigit() or len(n) > 15:
            raise ProtocolViolation("RESUME: bad disk size %r" % item[:32])
        sizes[disk] = int(n)
    return seed, name, resize == "1", sizes, macs
