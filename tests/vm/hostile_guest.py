#!/usr/bin/python3 -IS
"""A hostile guest agent, for the tests: a compromised qube's end of the agent link.

Copied into a real qube and run there as root (``tests/vm/hostile.py`` does
it), it takes the agent's virtio-serial port from the real agent and speaks
the protocol as a compromised qube would.  The tests drive it through dom0
itself: each command that ``qvm-run`` sends (an EXEC frame) is a directive,
answered first (so that ``qvm-run`` returns) and then carried out:

    echo TEXT               answer "fake:TEXT" -- the link works, and it is us
    hello-flood SECS        write HELLO frames for SECS seconds, then behave
    stall SECS              read nothing from the port for SECS seconds
    no-credit               keep the channel: take its input, never credit it, never exit
    drip                    2-byte STDOUT frames for as long as dom0 gives credit, never exit
    raw HEX                 write these bytes as they are (frame by frame driving)
    call-flood N TARGET SVC ask dom0 for N qrexec calls at once (CALL frames)
    release                 give the port back to the real agent (init restarts it)

Directives may be chained: ``hello-flood 2 ; stall 60``.  SHUTDOWN, SIGNAL
and anything it does not know are ignored: a hostile qube obeys nothing.
It imports only the guest's own protocol module, as the real agent does.
"""

import os
import select
import sys
import time

sys.path.insert(0, "/usr/lib/bulkhead")
from bulkhead_guest import protocol as P  # noqa: E402
from bulkhead_guest.agent import find_port  # noqa: E402

HELLO = P.pack(P.HELLO, 0, P.u32(P.VERSION))
OUT_CAP = 256 * 1024


def log(msg):
    try:
        os.write(2, ("hostile-agent: %s\n" % msg).encode())
    except OSError:
        pass


def kill_real_agent():
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"/usr/lib/bulkhead/qrexec-agent" in cmd:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def seize(port):
    """Kill the real agent until the port is ours (init keeps restarting it)."""
    for _ in range(600):
        kill_real_agent()
        try:
            return os.open(port, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.01)
    raise SystemExit("cannot take the port %s" % port)


class Hostile:
    def __init__(self, fd):
        self.fd = fd
        self.out = bytearray(HELLO)
        self.reader = P.FrameReader(P.FROM_DOM0)
        self.plan = []              # directives still to carry out, in order
        self.flood_until = 0.0
        self.stall_until = 0.0
        self.drips = {}             # chan -> credit left
        self.quit = False

    # --- directives --------------------------------------------------------
    def answer(self, chan, text, code=0):
        if text:
            self.out += P.pack(P.STDOUT, chan, text.encode()[:P.MAX_PAYLOAD])
        self.out += P.pack(P.STDOUT, chan, b"") + P.pack(P.STDERR, chan, b"")
        self.out += P.pack(P.EXIT, chan, P.i32(code))

    def directive(self, chan, command):
        words = command.split()
        if not words:
            self.answer(chan, "", 127)
        elif words[0] == "echo":
            self.answer(chan, "fake:%s\n" % " ".join(words[1:]))
        elif words[0] == "no-credit":
            pass                    # the channel stays open; its input is never credited
        elif words[0] == "drip":
            self.drips[chan] = P.WINDOW
        else:
            self.answer(chan, "ok\n")
            self.plan = [step.split() for step in command.split(";") if step.split()]

    def next_step(self, now):
        while self.plan and now >= max(self.flood_until, self.stall_until):
            step = self.plan.pop(0)
            if step[0] == "hello-flood":
                self.flood_until = now + float(step[1])
            elif step[0] == "stall":
                self.stall_until = now + float(step[1])
            elif step[0] == "raw":
                self.out += bytes.fromhex(step[1])
            elif step[0] == "call-flood":
                request = step[2].encode() + b"\0" + step[3].encode()
                for i in range(int(step[1])):
                    self.out += P.pack(P.CALL, P.GUEST_CHANNEL | (i + 1), request)
            elif step[0] == "release":
                self.quit = True

    # --- frames from dom0 --------------------------------------------------
    def handle(self, mtype, chan, payload):
        if mtype == P.EXEC:
            _user, command = P.split_exec(payload)
            self.directive(chan, command)
        elif mtype == P.PING:
            self.out += P.pack(P.PONG, 0, payload)
        elif mtype == P.CREDIT and chan in self.drips:
            self.drips[chan] += P.parse_u32(payload)
        # STDIN is swallowed uncredited; SHUTDOWN, SIGNAL, HELLO: ignored

    def dom0_gone(self):
        self.reader = P.FrameReader(P.FROM_DOM0)
        self.drips.clear()
        self.out = bytearray(HELLO)

    # --- the loop ---------------------------------------------------------
    def fill(self, now):
        if now < self.flood_until and len(self.out) < OUT_CAP:
            self.out += HELLO * 4096
        for chan in self.drips:
            if len(self.out) >= OUT_CAP:
                break
            n = min(self.drips[chan] // 2, 4096)
            if n:
                self.out += P.pack(P.STDOUT, chan, b"xx") * n
                self.drips[chan] -= 2 * n

    def run(self):
        while not self.quit:
            now = time.monotonic()
            self.next_step(now)
            self.fill(now)
            reading = now >= self.stall_until
            events = (select.POLLIN if reading else 0) | (select.POLLOUT if self.out else 0)
            poller = select.poll()
            poller.register(self.fd, events)
            ready = poller.poll(100)
            ev = ready[0][1] if ready else 0
            if ev & select.POLLOUT and self.out:
                try:
                    del self.out[:os.write(self.fd, self.out)]
                except (BlockingIOError, OSError):
                    pass
            if ev & select.POLLIN and reading:
                try:
                    data = os.read(self.fd, 65536)
                except (BlockingIOError, OSError):
                    data = None
                if data == b"":
                    self.dom0_gone()
                    time.sleep(0.05)
                elif data:
                    try:
                        for frame in self.reader.feed(data):
                            self.handle(*frame)
                    except P.ProtocolViolation as e:
                        log("dom0 broke the protocol? %s" % e)
                        self.dom0_gone()
            elif ev & select.POLLHUP:
                # No dom0 on the other end (it dropped us): what we had for it is
                # moot; say HELLO when it comes back, as the real agent does.
                self.dom0_gone()
                time.sleep(0.05)
        os.close(self.fd)


def main():
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)  # let qvm-run return first
    port = find_port()
    if not port:
        raise SystemExit("no agent port")
    Hostile(seize(port)).run()


if __name__ == "__main__":
    main()
