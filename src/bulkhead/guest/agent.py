"""Bulkhead's guest agent: runs in every qube, serves dom0 over one virtio-serial port.

It plays the part of Qubes' qrexec-agent: dom0 asks it to run a command or a
qrexec service as ``user`` or ``root``; stdin, stdout and stderr stream both
ways with credit-based flow control, many calls at once on one port; the exit
code comes back at the end.  It also powers the qube off when dom0 asks.

Start-up speed matters (dom0 counts a qube as started when this agent says
HELLO), and under TCG every imported module costs tens of milliseconds.  So
this module imports only builtins -- ``os``, ``sys``, ``select``, ``pwd``, ``time`` and
its siblings (:mod:`protocol`, :mod:`spawn`: how a call's process starts,
:mod:`services`: services run in a fork of the agent, :mod:`restore`: a restored
qube becoming itself, imported only there) -- and uses ``os.fork``/``os.execve`` and pidfds
instead of ``subprocess``, ``signal``, ``asyncio`` or threads.
"""

import os
import select
import stat
import sys
import time

from . import protocol as P
from .caller import SOCKET as CALL_SOCKET, STREAM_READ, Caller
from .datadisk import DataDisk, InputQueue, widen_pipe
from .spawn import PATH, SHELL, spawn, spawn_root, spawn_spare
from .services import (FILECOPY_SERVICE, NETCONF_SERVICE, READ_CHUNK, filecopy_main,
                       is_sh_script, mode, netconf_main, plain, socket_relay)

PORT_NAME = "org.qubes-os.qrexec"
RPC_DIRS = ("/etc/qubes-rpc", "/usr/local/etc/qubes-rpc")
# Seconds after a spare shell was taken that it is replaced even while calls run.
SPARE_DELAY = 0.05
READY_MARK = "/run/bulkhead/agent-ready"
# How much dom0-bound output may wait in our send buffer before we stop reading
# from children (credits already bound it per call; this bounds the total).
OUT_HIGH_WATER = 4 * 1024 * 1024

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
POLLERRS = select.POLLERR | select.POLLHUP | select.POLLNVAL


def log(msg):
    try:
        os.write(2, ("bulkhead-agent: %s\n" % msg).encode("utf-8", "replace"))
    except OSError:
        pass


def find_port():
    """The /dev node of our virtio-serial port, found by its name in sysfs (no udev here)."""
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open("%s/%s/name" % (base, entry)) as f:
                if f.read().strip() == PORT_NAME:
                    return "/dev/" + entry
        except OSError:
            continue
    return None


class Call:
    """One command or service run for dom0 on one channel."""

    def __init__(self, chan, pid, pidfd, stdin_fd, stdout_fd, stderr_fd, disk):
        self.chan = chan
        self.pid = pid
        self.pidfd = pidfd
        self.stdin_fd = stdin_fd          # our write end of the child's stdin, or None once closed
        self.out_fds = {stdout_fd: P.STDOUT, stderr_fd: P.STDERR}
        self.stdin_buf = InputQueue(disk)   # DATA runs wait in the disk's buffers
        self.stdin_eof = False
        self.credit = P.WINDOW            # bytes of output we may still send before dom0 credits us
        self.exit_code = None
        self.orphaned = False             # dom0 went away: discard output, just reap
        self.wide = False                 # its stdin pipe was widened for DATA runs

    def finished(self):
        return self.exit_code is not None and not self.out_fds


class Agent:
    def __init__(self, port_path):
        self.port_path = port_path
        self.fd = -1
        self.reader = None
        self.out = bytearray()
        self.calls = {}        # chan -> Call
        self.by_fd = {}        # fd -> (Call, role) role in "stdin", "out", "pid"; (proc, "spare")
        self.spares = {}       # user -> prespawned shells waiting for their command
        # Users whose spares to top up, once no call runs and nothing else waits (see
        # run): even a spawn (spawn_spare) is work for this loop that the call that
        # took the spare should not wait behind -- its exit, its output.  Between two
        # calls it overlaps their trip through dom0.
        self.spares_wanted = set()
        self.spare_taken_at = 0.0
        self.orphans = set()   # calls of a dom0 connection that has gone, still to be reaped
        self.connected = False
        self.caller = Caller(self)  # the qrexec calls this qube makes (qrexec-client-vm)
        self.data_disk = DataDisk()  # where dom0 puts bulk bytes (DATA frames)

    # --- the port ---------------------------------------------------------
    def open_port(self):
        # The port is exclusive: retry while someone else (a previous agent) holds it.
        while True:
            try:
                self.fd = os.open(self.port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as e:
                log("cannot open %s (%s); retrying" % (self.port_path, e.strerror))
                select.poll().poll(500)
        self.hello()

    def hello(self):
        self.reader = P.FrameReader(P.FROM_DOM0)
        self.out = bytearray(P.pack(P.HELLO, 0, P.u32(P.VERSION)))
        self.connected = False

    def send(self, mtype, chan, payload=b""):
        self.out += P.pack(mtype, chan, payload)

    def send_stream(self, mtype, chan, data):
        """Bytes of a stream, read in one go (up to :data:`STREAM_READ`), as frames."""
        for start in range(0, len(data), P.MAX_PAYLOAD):
            self.out += P.pack(mtype, chan, data[start:start + P.MAX_PAYLOAD])

    def flush(self):
        """Write what waits for dom0 until it is all out or the port is full.

        virtio_console takes at most 32 KiB a write: one write a turn of the loop
        (each a poll set rebuilt, a fraction of a ms under TCG) would pace a bulk
        stream at 32 KiB a turn."""
        try:
            while self.out:
                n = os.write(self.fd, self.out)
                if n <= 0:
                    return
                del self.out[:n]
        except OSError:
            pass   # full (BlockingIOError): POLLOUT says when; gone: the read side notices

    def dom0_gone(self):
        """dom0 closed its end (daemon restart or it dropped us): detach every call, say hello again.

        The calls' processes run on, their output discarded; they leave the
        channel table, because the next dom0 numbers its channels afresh.
        """
        for call in list(self.calls.values()):
            call.orphaned = True
            self.close_stdin(call)
            self.orphans.add(call)
        self.calls.clear()
        self.caller.dom0_gone()
        self.hello()

    # --- calls ----------------------------------------------------------------
    def attach(self, chan, proc):
        """Make a spawned process the call on channel ``chan``."""
        pid, pidfd, in_w, out_r, err_r, _ = proc
        call = Call(chan, pid, pidfd, in_w, out_r, err_r, self.data_disk)
        self.calls[chan] = call
        self.by_fd[in_w] = (call, "stdin")
        self.by_fd[out_r] = (call, "out")
        self.by_fd[err_r] = (call, "out")
        self.by_fd[pidfd] = (call, "pid")

    def check_new_call(self, chan):
        if chan in self.calls:
            raise P.ProtocolViolation("channel %d already in use" % chan)
        if len(self.calls) >= P.MAX_CHANNELS:
            self.refuse(chan, "too many calls at once")
            return False
        return True

    def start_call(self, chan, user, path, argv, extra_env, run=None):
        if not self.check_new_call(chan):
            return
        try:
            self.attach(chan, spawn(user, path, argv, extra_env, run=run))
        except KeyError:
            self.refuse(chan, "no such user: %s" % user)

    # A command's shell is started before the command arrives, as Qubes'
    # qrexec-fork-server does: under TCG, starting /bin/sh costs ~40 ms (a
    # fork and a dynamically linked exec), most of a qvm-run round trip.  The
    # spare shell waits on fd 3 for its script, ``. /proc/self/fd/3``: the
    # command runs exactly as ``sh -c`` would run it, in that same shell.
    # Two spares per user: back-to-back calls then each find one whose start
    # has had two calls' time to finish.
    SPARES_PER_USER = 2

    def prespawn(self, user, most=SPARES_PER_USER):
        """Start up to ``most`` spares for ``user``; True if the pool is still short."""
        pool = self.spares.setdefault(user, [])
        while len(pool) < self.SPARES_PER_USER and most > 0:
            try:
                proc = spawn_spare(user)
            except KeyError:
                return False
            pool.append(proc)
            self.by_fd[proc[1]] = (proc, "spare")
            most -= 1
        return len(pool) < self.SPARES_PER_USER

    def spare_died(self, proc):
        pid, pidfd, in_w, out_r, err_r, ctl_w = proc
        for pool in self.spares.values():
            if proc in pool:
                pool.remove(proc)
        self.by_fd.pop(pidfd, None)
        for fd in (pidfd, in_w, out_r, err_r, ctl_w):
            os.close(fd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def exec_request(self, chan, payload):
        user, command = P.split_exec(payload)
        self.run_in_spare(chan, user, command)

    def run_in_spare(self, chan, user, command):
        """Run ``command`` as ``user`` in a prespawned shell (a new one if none waits)."""
        if not self.check_new_call(chan):
            return
        pool = self.spares.get(user)
        proc = pool.pop(0) if pool else None
        if proc is None:
            self.start_call(chan, user, SHELL[0], [SHELL[1], "-c", command],
                            {"QREXEC_REMOTE_DOMAIN": "dom0"})
            self.spares_wanted.add(user)
            return
        self.by_fd.pop(proc[1], None)
        ctl_w = proc[5]
        # The script first closes fd 3, so the command's processes don't inherit it.
        script = b"exec 3<&-\n" + command.encode() + b"\n"
        try:
            os.write(ctl_w, script)  # fits in the pipe: MAX_COMMAND < the pipe's 64 KiB
        except OSError:
            pass  # the spare died: the call ends with its exit status
        os.close(ctl_w)
        self.attach(chan, proc)
        self.spares_wanted.add(user)
        self.spare_taken_at = time.monotonic()

    def refuse(self, chan, message):
        self.send(P.ERROR, chan, message.encode("utf-8")[:1024])
        self.send(P.EXIT, chan, P.i32(127))

    def service_request(self, chan, payload):
        user, service, source = P.split_service(payload)
        name, _, arg = service.partition("+")
        # --- networking: dom0 pushes this qube's network state (bulkhead_guest.netconf) ---
        if service == NETCONF_SERVICE:
            if source != "dom0":
                return self.refuse(chan, "%s is dom0's alone" % NETCONF_SERVICE)
            return self.start_call(chan, "root", "netconf", [], {}, run=netconf_main)
        # --- end networking ---
        for d in RPC_DIRS:
            for candidate in (service, name) if service != name else (name,):
                path = "%s/%s" % (d, candidate)
                if stat.S_ISSOCK(mode(path)):
                    # Qubes' socket services: a daemon listens there; it gets a header
                    # "SERVICE+ARG SOURCE\0", then the call's data both ways.
                    header = ("%s %s" % (service, source)).encode() + b"\0"
                    return self.start_call(chan, user, path, [path], {},
                                           run=lambda: socket_relay(path, header))
                if os.path.isfile(path):
                    if path == FILECOPY_SERVICE:
                        # The template's own unpacker, run in a fork of ours: no Python
                        # start (~0.3 s under TCG) before the first byte is taken.
                        return self.start_call(chan, user, path, [path], {
                            "QREXEC_REMOTE_DOMAIN": source, "QREXEC_SERVICE_FULL_NAME": service,
                            "QREXEC_SERVICE_ARGUMENT": arg}, run=filecopy_main)
                    if is_sh_script(path) and plain(source):
                        # Sourced by a prespawned shell: no exec of a new /bin/sh, which
                        # is most of a trivial call's time under TCG.  (Only $0 differs.)
                        self.run_in_spare(chan, user, "export QREXEC_REMOTE_DOMAIN=%s "
                                          "QREXEC_SERVICE_FULL_NAME=%s QREXEC_SERVICE_ARGUMENT=%s; "
                                          ". %s" % (source, service, arg, path))
                        return
                    if os.access(path, os.X_OK):
                        prog, argv = path, [path]
                    else:
                        prog, argv = "/bin/sh", ["sh", path]
                    env = {"QREXEC_REMOTE_DOMAIN": source, "QREXEC_SERVICE_FULL_NAME": service,
                           "QREXEC_SERVICE_ARGUMENT": arg}
                    return self.start_call(chan, user, prog, argv, env)
        self.refuse(chan, "service %s not found" % service)

    def resume_request(self, chan, payload):
        """We were restored from a saved boot state: become this qube (see protocol.py)."""
        seed, name, resize, sizes, macs = P.split_resume(payload)
        if not self.check_new_call(chan):
            return
        from . import restore  # noqa: PLC0415 -- only a restored qube needs it
        try:
            restore.reseed(seed)
        except OSError as e:
            # Never run as this qube on a state another qube shares: dom0 fails the start.
            self.refuse(chan, "cannot reseed the kernel's RNG: %s" % e)
            return
        restore.forget_disks(sizes)
        restore.own_macs(macs)
        try:
            self.attach(chan, spawn_root(RC_QUBE, [RC_QUBE, name, "1" if resize else "0"]))
        except OSError as e:
            self.refuse(chan, "cannot run %s: %s" % (RC_QUBE, e))

    def close_stdin(self, call):
        if call.stdin_fd is not None:
            self.by_fd.pop(call.stdin_fd, None)
            os.close(call.stdin_fd)
            call.stdin_fd = None
        call.stdin_buf.clear()

    def close_out(self, call, fd):
        mtype = call.out_fds.pop(fd)
        self.by_fd.pop(fd, None)
        os.close(fd)
        if not call.orphaned:
            self.send(mtype, call.chan, b"")

    def reap(self, call):
        self.by_fd.pop(call.pidfd, None)
        os.close(call.pidfd)
        call.pidfd = None
        try:
            _, status = os.waitpid(call.pid, 0)
            call.exit_code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            call.exit_code = 255
        if call.exit_code < 0:  # killed by a signal: report it as a shell would
            call.exit_code = 128 - call.exit_code

    def maybe_finish(self, call):
        if not call.finished():
            return
        self.close_stdin(call)
        if call.orphaned:
            self.orphans.discard(call)
        else:
            self.send(P.EXIT, call.chan, P.i32(call.exit_code))
            del self.calls[call.chan]

    # --- frames from dom0 --------------------------------------------------
    def handle(self, mtype, chan, payload):
        if mtype == P.DATA:
            # Bytes dom0 put on our data disk: read them now (dom0 may reuse the place
            # once we have handled the frames it sent before its next PING), then they
            # are that stream's frame like any other.
            mtype, offset, length = P.split_data(
                payload, (P.STDOUT, P.STDERR) if chan & P.GUEST_CHANNEL else (P.STDIN,))
            try:
                payload = self.data_disk.read(offset, length)
            except OSError as e:
                raise P.ProtocolViolation("cannot read DATA: %s" % e) from None
            call = self.calls.get(chan)
            if call is not None and not call.wide and call.stdin_fd is not None:
                call.wide = True
                widen_pipe(call.stdin_fd)
        if mtype == P.HELLO:
            version = P.parse_u32(payload)
            if version != P.VERSION:
                raise P.ProtocolViolation("dom0 speaks protocol version %d, we speak %d"
                                          % (version, P.VERSION))
            if not self.connected and not os.path.exists(READY_MARK):
                self.first_hello()
            self.connected = True
            if self.caller.listener is None:
                try:
                    self.caller.listen()
                except OSError as e:
                    log("cannot listen for qrexec calls on %s: %s" % (CALL_SOCKET, e))
        elif mtype == P.PING:
            self.send(P.PONG, 0, payload)
        elif mtype == P.SHUTDOWN:
            log("dom0 asked us to power off")
            # The agent becomes rc.shutdown (stop everything, unmount, reboot: QEMU
            # exits).  busybox init's own ::shutdown action was found not to run here,
            # which left the private volume's journal to be replayed at every start.
            try:
                os.execv(RC_SHUTDOWN, [RC_SHUTDOWN])
            except OSError as e:
                log("cannot run %s: %s; asking init" % (RC_SHUTDOWN, e))
                os.kill(1, 15)  # busybox init: SIGTERM = kill everything, then reboot
        elif mtype == P.EXEC:
            self.exec_request(chan, payload)
        elif mtype == P.SERVICE:
            self.service_request(chan, payload)
        elif mtype == P.RESUME:
            self.resume_request(chan, payload)
        elif chan & P.GUEST_CHANNEL:
            self.caller.frame(mtype, chan, payload)
        else:
            call = self.calls.get(chan)
            if call is None:
                return  # a late frame for a call that just ended: harmless
            if mtype == P.STDIN:
                if not payload:
                    call.stdin_eof = True
                    if not call.stdin_buf:
                        self.close_stdin(call)
                elif call.stdin_fd is None:
                    self.send(P.CREDIT, chan, P.u32(len(payload)))  # child closed stdin: drop
                else:
                    # Written on POLLOUT, a turn later: what more frames bring in the
                    # meantime goes in the same write and the same CREDIT.  (Writing each
                    # at once made dom0 send smaller DATA runs, each a disk read: 4x slower.)
                    call.stdin_buf.add(payload)
            elif mtype == P.CREDIT:
                call.credit += P.parse_u32(payload)
            elif mtype == P.SIGNAL:
                try:
                    os.killpg(call.pid, P.parse_u32(payload))
                except (ProcessLookupError, PermissionError, OverflowError, ValueError):
                    pass

    def first_hello(self):
        """The qube is up: record when, bring the other vCPUs online, drop the I/O
        scheduler.

        dom0 boots qubes with one vCPU online (``maxcpus=1``) because bringing
        up the others takes a good part of a second under TCG; now that the
        qube counts as started, that work is off the start's path.
        """
        try:
            os.makedirs(os.path.dirname(READY_MARK), exist_ok=True)
            os.close(os.open(READY_MARK, os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError:
            pass
        if _saved_boot():
            # This boot's state is saved: what a restore needs is loaded now, once,
            # rather than by each restored qube.
            from . import restore  # noqa: F401
            # ...and the file-copy unpacker, which runs in a fork of ours: imported
            # in each fork it cost every qvm-copy ~20 ms under TCG.
            from . import filecopy  # noqa: F401
            # ...and what only the boot read is let go: the page cache and the
            # dentries and inodes of the boot's files.  Freed, it is reported to the
            # host (the balloon's free page reporting, order 0: rc.sysinit), so the
            # saved state does not hold it and no restored qube has it resident.
            # dom0 waits for the report before it saves (bootstate.REPORT_SECONDS).
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
            except OSError as e:
                log("cannot drop the boot's caches: %s" % e)
        # ...and no I/O scheduler (Linux picks mq-deadline for a single-queue disk):
        # the host orders the requests anyway, and the scheduler's bookkeeping costs
        # the guest CPU on each (under TCG, 100 MiB written with fsync took 0.6 s and
        # 1.0 s of CPU without it, 0.9 s and 1.5 s with it).  Here, not in rc.sysinit:
        # switching 4 disks takes ~0.4 s (each queue is frozen), which a start would
        # wait for; a restored qube has it done already (its saved boot did it).
        script = ("for c in /sys/devices/system/cpu/cpu[0-9]*/online; do "
                  "read -r on < $c; [ $on = 0 ] && echo 1 > $c; done; "
                  "for q in /sys/block/vd*/queue/scheduler; do echo none > $q; done")
        try:
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", script], {"PATH": PATH})
            self.by_fd[os.pidfd_open(pid)] = (pid, "helper")
        except OSError as e:
            log("cannot bring the other vCPUs online: %s" % e)

    # --- the loop ------------------------------------------------------------
    def poll_set(self):
        want = {self.fd: POLLIN | (POLLOUT if self.out else 0)}
        room = len(self.out) < OUT_HIGH_WATER
        for fd, (call, role) in self.by_fd.items():
            if role in ("pid", "spare", "helper"):
                want[fd] = POLLIN
            elif role == "stdin":
                if call.stdin_buf:
                    want[fd] = POLLOUT
            elif room and (call.credit > 0 or call.orphaned):
                want[fd] = POLLIN
        self.caller.poll_set(want)
        return want

    def run(self):
        self.open_port()
        while True:
            want = self.poll_set()
            poller = select.poll()
            for fd, ev in want.items():
                poller.register(fd, ev)
            timeout = -1
            if self.spares_wanted:
                # Once nothing waits and no call runs; or, while calls run (a
                # long-lived one would hold it off for good), SPARE_DELAY after the
                # last spare was taken.
                late = time.monotonic() - self.spare_taken_at - SPARE_DELAY
                timeout = 0 if not self.calls else max(0, int(-late * 1000) + 1)
            events = [] if self.calls and timeout == 0 else poller.poll(timeout)
            if not events and self.spares_wanted:
                # One at a time, looking for work in between.
                user = self.spares_wanted.pop()
                if self.prespawn(user, 1):
                    self.spares_wanted.add(user)
                continue
            for fd, ev in events:
                if fd == self.fd:
                    self.port_event(ev)
                elif fd in self.by_fd:
                    self.child_event(fd, ev)
                elif fd in self.caller.fds:
                    self.caller.event(fd, ev)
            # Send what these events produced now, not a turn of the loop later (a
            # turn is a poll set rebuilt: a fraction of a ms under TCG, several per
            # call).  What does not fit waits for POLLOUT.
            self.flush()

    def port_event(self, ev):
        if ev & POLLOUT:
            self.flush()
        if ev & POLLIN:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.dom0_gone()
                self.idle_until_host()
                return
            try:
                for mtype, chan, payload in self.reader.feed(data):
                    self.handle(mtype, chan, payload)
            except P.ProtocolViolation as e:
                # dom0 is trusted; a violation means a bug or version skew.  Start over.
                log("protocol error from dom0: %s" % e)
                self.dom0_gone()
        elif ev & select.POLLHUP:
            # No host end connected: the port reports HUP until dom0 connects.
            self.idle_until_host()

    def idle_until_host(self):
        select.poll().poll(50)

    def child_event(self, fd, ev):
        call, role = self.by_fd[fd]
        if role == "spare":
            self.spare_died(call)
            return
        if role == "helper":  # a helper of the agent's own finished: reap it
            del self.by_fd[fd]
            os.close(fd)
            try:
                os.waitpid(call, 0)
            except ChildProcessError:
                pass
            return
        if role == "pid":
            self.reap(call)
        elif role == "stdin":
            if ev & (select.POLLERR | select.POLLHUP):
                self.close_stdin(call)  # the child closed its stdin
            else:
                self.feed_stdin(call)
        else:
            limit = STREAM_READ if call.orphaned else min(STREAM_READ, call.credit)
            try:
                data = os.read(fd, limit)
            except BlockingIOError:
                return
            if not data:
                self.close_out(call, fd)
            elif not call.orphaned:
                call.credit -= len(data)
                self.send_stream(call.out_fds[fd], call.chan, data)
        self.maybe_finish(call)

    def feed_stdin(self, call):
        """Write what waits for the child's stdin, as far as its pipe takes it."""
        if call.stdin_fd is None or not call.stdin_buf:
            return
        try:
            n = call.stdin_buf.write(call.stdin_fd)
        except BlockingIOError:
            return
        except BrokenPipeError:
            n = call.stdin_buf.size
            self.close_stdin(call)
        if not call.orphaned:
            self.send(P.CREDIT, call.chan, P.u32(n))
        if call.stdin_eof and not call.stdin_buf:
            self.close_stdin(call)


RC_QUBE = "/usr/lib/bulkhead/rc.qube"
RC_SHUTDOWN = "/usr/lib/bulkhead/rc.shutdown"


def _saved_boot():
    try:
        with open("/proc/cmdline") as f:
            return "bulkhead.saved=1" in f.read().split()
    except OSError:
        return False


def main():
    port = None
    for _ in range(100):
        port = find_port()
        if port:
            break
        select.poll().poll(20)
    if not port:
        log("no virtio-serial port named %s: is this a Bulkhead qube?" % PORT_NAME)
        return 1
    Agent(port).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
