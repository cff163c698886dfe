"""A qube restored from a saved boot state becomes itself (the agent's RESUME call).

Every qube restored from one state starts with the same kernel RNG pool, the same
MACs and the kernel's view of the saved boot's placeholder disks; dom0's RESUME
message (:func:`bulkhead_guest.protocol.split_resume`) carries what makes this one
its own, and these functions apply it before ``rc.qube`` runs.  Only a restored
qube imports this module (see :mod:`bulkhead.bootstate` for dom0's side).
"""

import fcntl
import os
import select
import socket

RNDADDENTROPY = 0x40085203   # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207       # _IO('R', 0x07)
BLKFLSBUF = 0x1261           # _IO(0x12, 97)


def reseed(seed):
    """Mix dom0's fresh bytes into the kernel's pool, credited, and make the CRNG rekey
    now: every qube restored from one saved state had the same pool until here."""
    info = (len(seed) * 8).to_bytes(4, "little") + len(seed).to_bytes(4, "little") + seed
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, info)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as e:
        log("cannot reseed the kernel's RNG: %s" % e)
        raise


SIOCSIFHWADDR = 0x8924


def own_macs(macs):
    """Give each network device this qube's MAC in place of the saved boot's (the
    devices are still down: the network is set up after, by dom0's configuration)."""
    if not macs:
        return
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name in names:
            try:
                with open("/sys/class/net/%s/address" % name) as f:
                    saved = f.read().strip()
            except OSError:
                continue
            own = macs.get(saved)
            if own is None:
                continue
            ifr = (name.encode()[:15].ljust(16, b"\0") + (1).to_bytes(2, "little")   # ARPHRD_ETHER
                   + bytes(int(x, 16) for x in own.split(":")) + bytes(8))
            try:
                fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, ifr)
            except OSError as e:
                log("cannot set the MAC of %s: %s" % (name, e))
    finally:
        s.close()


def forget_disks(sizes, timeout_ms=3000):
    """Make the kernel forget the placeholder disks of the saved boot: wait until it has
    taken each disk's real capacity (dom0 signals it with a resize), then drop every
    sector it cached from them."""
    waited = 0
    for disk, sectors in sizes.items():
        path = "/sys/block/%s/size" % disk
        while True:
            try:
                with open(path) as f:
                    now = int(f.read().strip() or "0")
            except (OSError, ValueError):
                break
            if now == sectors or waited >= timeout_ms:
                if now != sectors:
                    log("%s still has %d sectors, not %d" % (disk, now, sectors))
                break
            select.poll().poll(5)
            waited += 5
        try:
            fd = os.open("/dev/" + disk, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, BLKFLSBUF)
            finally:
                os.close(fd)
        except OSError as e:
            log("cannot flush the cached sectors of %s: %s" % (disk, e))


def log(msg):
    try:
        os.write(2, ("bulkhead-agent: %s\n" % msg).encode("utf-8", "replace"))
    except OSError:
        pass
