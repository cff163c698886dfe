"""A hostile GUI agent, run as root inside a qube by tests/vm/test_gui_hostile.py.

``python3 hostile_gui_guest.py ATTACK``: stops the real GUI agent, takes the
GUI port, waits for dom0's HELLO, sends ATTACK, then holds the port open (so
that dom0 closes the connection for what it read, not for an end of stream).
Builtins only; the protocol constants are written out here on purpose: this
is what a compromised qube would send, not what our agent would.
"""

import os
import select
import struct
import subprocess
import sys
import time

HDR = struct.Struct("<HHII")
HELLO, CREATE, MAP, TITLE, PIXELS = 1, 2, 5, 7, 9


def msg(mtype, wid, payload=b""):
    return HDR.pack(mtype, 0, wid, len(payload)) + payload


def create(wid, x=10, y=10, w=40, h=30):
    return msg(CREATE, wid, struct.pack("<iiIII", x, y, w, h, 0))


HELLO_MSG = msg(HELLO, 0, struct.pack("<I", 2))   # gui_protocol.VERSION
ATTACKS = {
    "garbage": b"\x13\x37garbage that is not a frame\xff\xfe\x00\x01" * 4,
    "huge": HELLO_MSG + create(0x100, w=100000, h=100000),
    "negative": HELLO_MSG + create(0x100, x=-100000, y=-5),
    "overflow": HELLO_MSG + create(0x100) + msg(MAP, 0x100)
    + msg(PIXELS, 0x100, struct.pack("<IIII", 0xFFFFFFF0, 0, 40, 1) + b"\0" * 160),
    "windows": HELLO_MSG + b"".join(create(0x100 + i, w=4, h=4) for i in range(10000)),
    "short": HELLO_MSG + create(0x100) + msg(MAP, 0x100)
    + msg(PIXELS, 0x100, struct.pack("<IIII", 0, 0, 40, 30) + b"\0" * 100),
    "long": HELLO_MSG + create(0x100) + msg(MAP, 0x100)
    + msg(PIXELS, 0x100, struct.pack("<IIII", 0, 0, 10, 10) + b"\0" * 800),
    # Not a violation: the title is shown cleaned (the test checks how).
    "title": HELLO_MSG + create(0x100) + msg(MAP, 0x100)
    + msg(TITLE, 0x100, "evil\u202e\u2066\x07\x1b[2J\nname".encode() + b"x" * 300),
}


def port():
    for entry in os.listdir("/sys/class/virtio-ports"):
        with open("/sys/class/virtio-ports/%s/name" % entry) as f:
            if f.read().strip() == "org.bulkhead.gui":
                return "/dev/" + entry
    raise SystemExit("no GUI port")


def main():
    attack = ATTACKS[sys.argv[1]]
    subprocess.run(["pkill", "-f", "usr/lib/bulkhead/gui-agent"], check=False)
    subprocess.run(["pkill", "-f", "bulkhead_guest.gui_agent"], check=False)
    fd = -1
    for _ in range(500):
        try:
            fd = os.open(port(), os.O_RDWR)
            break
        except OSError:
            time.sleep(0.02)
    print("seized", flush=True)
    got = b""
    deadline = time.monotonic() + 120
    while len(got) < 24 and time.monotonic() < deadline:   # dom0's HELLO: 12 + 12 bytes
        p = select.poll()
        p.register(fd, select.POLLIN)
        ev = p.poll(200)
        if ev and ev[0][1] & select.POLLIN:
            got += os.read(fd, 64)
        else:
            time.sleep(0.1)
    view = memoryview(attack)
    while view:
        view = view[os.write(fd, view[:65536]):]
    time.sleep(30)


if __name__ == "__main__":
    main()
