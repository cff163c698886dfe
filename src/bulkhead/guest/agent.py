"""Bulkhead's guest agent: runs in every qube, serves dom0 over one virtio-serial port.

It plays the part of Qubes' qrexec-agent: dom0 asks it to run a command or a
qrexec service as ``user`` or ``root``; stdin, stdout and stderr stream both
ways with credit-based flow control, many calls at once on one port; the exit
code comes back at the end.  It also powers the qube off when dom0 asks.

Start-up speed matters (dom0 counts a qube as started when this agent says
HELLO), and under TCG every imported module costs tens of milliseconds.  So
this module imports only builtins -- ``os``, ``sys``, ``select``, ``pwd``, ``time`` and
the sibling :mod:`protocol` -- and uses ``os.fork``/``os.execve`` and pidfds
instead of ``subprocess``, ``signal``, ``asyncio`` or threads.
"""

import os
import pwd
import select
import stat
import sys
import time

from . import protocol as P
from .caller import SOCKET as CALL_SOCKET, Caller
from .datadisk import DataDisk, widen_pipe

PORT_NAME = "org.qubes-os.qrexec"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RPC_DIRS = ("/etc/qubes-rpc", "/usr/local/etc/qubes-rpc")
# Commands run with Debian's /bin/sh, as Qubes' agent runs them.  (Busybox's
# static shell would start faster under TCG, but it runs its own applets in
# place of the real programs: `dpkg` would be busybox's.)
SHELL = ("/bin/sh", "sh")
READ_CHUNK = 65536
# Seconds after a spare shell was taken that it is replaced even while calls run.
SPARE_DELAY = 0.05
READY_MARK = "/run/bulkhead/agent-ready"
# How much dom0-bound output may wait in our send buffer before we stop reading
# from children (credits already bound it per call; this bounds the total).
OUT_HIGH_WATER = 4 * 1024 * 1024
# --- GUI (issue 10): in a qube with a GUI agent, commands find its X server (as in Qubes).
try:
    with open("/proc/cmdline") as _f:
        GUI_ENV = {"DISPLAY": ":0"} if "bulkhead.gui=1" in _f.read().split() else {}
except OSError:
    GUI_ENV = {}

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

    def __init__(self, chan, pid, pidfd, stdin_fd, stdout_fd, stderr_fd):
        self.chan = chan
        self.pid = pid
        self.pidfd = pidfd
        self.stdin_fd = stdin_fd          # our write end of the child's stdin, or None once closed
        self.out_fds = {stdout_fd: P.STDOUT, stderr_fd: P.STDERR}
        self.stdin_buf = bytearray()
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
    def spawn(self, user, path, argv, extra_env, control=False, run=None):
        """Fork and exec ``argv`` as ``user`` with fresh stdin/stdout/stderr pipes.

        With ``control``, the child also gets a pipe on fd 3 and the result
        holds its write end (see :meth:`prespawn`).  Returns
        ``(pid, pidfd, stdin_w, stdout_r, stderr_r, control_w)``; raises
        KeyError for an unknown user.
        """
        pw = pwd.getpwnam(user)
        env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "PATH": PATH, "LANG": "C.UTF-8",
        }
        env.update(GUI_ENV)
        env.update(extra_env)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC) if control else (None, None)
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                os.setsid()
                for src, dst in ((in_r, 0), (out_w, 1), (err_w, 2), (ctl_r, 3)):
                    if src == dst:
                        os.set_inheritable(dst, True)  # dup2 onto itself keeps close-on-exec
                    elif src is not None:
                        os.dup2(src, dst)
                if pw.pw_uid != 0:
                    if ctl_r is not None:
                        # The shell reopens fd 3 by path (/proc/self/fd/3), which checks
                        # the pipe's owner: make it the user's.
                        os.fchown(3, pw.pw_uid, pw.pw_gid)
                    os.initgroups(pw.pw_name, pw.pw_gid)
                    os.setgid(pw.pw_gid)
                    os.setuid(pw.pw_uid)
                try:
                    os.chdir(pw.pw_dir)
                except OSError:
                    os.chdir("/")
                if run is not None:
                    # No exec: the child does the work itself, without the agent's
                    # descriptors (the port above all: a new agent must be able to open it).
                    os.closerange(3, 65536)
                    os.environ.clear()
                    os.environ.update(env)
                    os._exit(run())
                os.execve(path, argv, env)
            except BaseException as e:  # noqa: B036 -- report anything, then die
                try:
                    os.write(2, ("bulkhead-agent: cannot run %s: %s\n" % (path, e)).encode())
                finally:
                    os._exit(127)
        for fd in (in_r, out_w, err_w, ctl_r):
            if fd is not None:
                os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        return pid, os.pidfd_open(pid), in_w, out_r, err_r, ctl_w

    def spawn_spare(self, user):
        """A spare shell for ``user``, started with posix_spawn (vfork: no copy of this
        process' page tables, which costs 5-20 ms under TCG and held up calls).

        posix_spawn cannot switch users, so for the spawn this process takes the
        user's groups and *real* ids, keeping effective and saved root;
        ``resetids`` makes the child's effective ids the real ones, and its exec of
        the shell makes the saved ids the same: the shell has nothing of root.
        Then this process takes its own back (it is single-threaded: nothing else
        runs meanwhile; for that instant the user's processes could signal it, as
        they could any process of theirs -- within the qube, whose user it is).
        Returns what :meth:`spawn` returns; KeyError for an unknown user.
        """
        pw = pwd.getpwnam(user)
        if pw.pw_uid == 0:
            return self.spawn(user, SHELL[0], self.SPARE_ARGV,
                              {"QREXEC_REMOTE_DOMAIN": "dom0"}, control=True)
        env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "PATH": PATH, "LANG": "C.UTF-8",
            "QREXEC_REMOTE_DOMAIN": "dom0",
        }
        env.update(GUI_ENV)
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        # The shell reopens fd 3 by path (/proc/self/fd/3), which checks the pipe's owner.
        os.fchown(ctl_r, pw.pw_uid, pw.pw_gid)
        own_groups, own_cwd = os.getgroups(), os.getcwd()
        try:
            try:
                os.chdir(pw.pw_dir)
            except OSError:
                pass
            os.setgroups(groups)
            os.setresgid(pw.pw_gid, 0, 0)
            os.setresuid(pw.pw_uid, 0, 0)
            pid = os.posix_spawn(SHELL[0], self.SPARE_ARGV, env, setsid=True, resetids=True,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                               (os.POSIX_SPAWN_DUP2, out_w, 1),
                                               (os.POSIX_SPAWN_DUP2, err_w, 2),
                                               (os.POSIX_SPAWN_DUP2, ctl_r, 3)])
        finally:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)
            os.setgroups(own_groups)
            os.chdir(own_cwd)
            for fd in (in_r, out_w, err_w, ctl_r):
                os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        return pid, os.pidfd_open(pid), in_w, out_r, err_r, ctl_w

    def spawn_root(self, path, argv):
        """Run a root program of the agent's own (rc.qube) with posix_spawn: no fork of
        this process (copying its page tables is ~70 ms under TCG), no user switch."""
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(path, argv, {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"},
                                 file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                               (os.POSIX_SPAWN_DUP2, out_w, 1),
                                               (os.POSIX_SPAWN_DUP2, err_w, 2)],
                                 setsid=True)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        return pid, os.pidfd_open(pid), in_w, out_r, err_r, None

    def attach(self, chan, proc):
        """Make a spawned process the call on channel ``chan``."""
        pid, pidfd, in_w, out_r, err_r, _ = proc
        call = Call(chan, pid, pidfd, in_w, out_r, err_r)
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
            self.attach(chan, self.spawn(user, path, argv, extra_env, run=run))
        except KeyError:
            self.refuse(chan, "no such user: %s" % user)

    # A command's shell is started before the command arrives, as Qubes'
    # qrexec-fork-server does: under TCG, starting /bin/sh costs ~40 ms (a
    # fork and a dynamically linked exec), most of a qvm-run round trip.  The
    # spare shell waits on fd 3 for its script, ``. /proc/self/fd/3``: the
    # command runs exactly as ``sh -c`` would run it, in that same shell.
    # Two spares per user: back-to-back calls then each find one whose start
    # has had two calls' time to finish.
    SPARE_ARGV = ["sh", "-c", ". /proc/self/fd/3"]
    SPARES_PER_USER = 2

    def prespawn(self, user, most=SPARES_PER_USER):
        """Start up to ``most`` spares for ``user``; True if the pool is still short."""
        pool = self.spares.setdefault(user, [])
        while len(pool) < self.SPARES_PER_USER and most > 0:
            try:
                proc = self.spawn_spare(user)
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
            return self.start_call(chan, "root", "netconf", [], {}, run=_netconf_main)
        # --- end networking ---
        for d in RPC_DIRS:
            for candidate in (service, name) if service != name else (name,):
                path = "%s/%s" % (d, candidate)
                if stat.S_ISSOCK(_mode(path)):
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
                            "QREXEC_SERVICE_ARGUMENT": arg}, run=_filecopy_main)
                    if _is_sh_script(path) and _plain(source):
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
        try:
            reseed(seed)
        except OSError as e:
            # Never run as this qube on a state another qube shares: dom0 fails the start.
            self.refuse(chan, "cannot reseed the kernel's RNG: %s" % e)
            return
        forget_disks(sizes)
        own_macs(macs)
        try:
            self.attach(chan, self.spawn_root(RC_QUBE, [RC_QUBE, name, "1" if resize else "0"]))
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
                    call.stdin_buf += payload
            elif mtype == P.CREDIT:
                call.credit += P.parse_u32(payload)
            elif mtype == P.SIGNAL:
                try:
                    os.killpg(call.pid, P.parse_u32(payload))
                except (ProcessLookupError, PermissionError, OverflowError, ValueError):
                    pass

    def first_hello(self):
        """The qube is up: record when, and bring the other vCPUs online.

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
            import fcntl  # noqa: F401
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
        script = ("for c in /sys/devices/system/cpu/cpu[0-9]*/online; do "
                  "read -r on < $c; [ $on = 0 ] && echo 1 > $c; done")
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
            if self.out:
                # Send what these events produced now, not a turn of the loop later
                # (a turn is a poll set rebuilt: a fraction of a ms under TCG, several
                # per call).  What does not fit waits for POLLOUT as before.
                try:
                    del self.out[:os.write(self.fd, self.out)]
                except OSError:
                    pass

    def port_event(self, ev):
        if ev & POLLOUT and self.out:
            try:
                n = os.write(self.fd, self.out)
                del self.out[:n]
            except BlockingIOError:
                pass
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
                try:
                    n = os.write(fd, call.stdin_buf)
                except BlockingIOError:
                    return
                except BrokenPipeError:
                    n = len(call.stdin_buf)
                    self.close_stdin(call)
                else:
                    del call.stdin_buf[:n]
                if not call.orphaned:
                    self.send(P.CREDIT, call.chan, P.u32(n))
                if call.stdin_eof and not call.stdin_buf:
                    self.close_stdin(call)
        else:
            limit = READ_CHUNK if call.orphaned else min(READ_CHUNK, call.credit)
            try:
                data = os.read(fd, limit)
            except BlockingIOError:
                return
            if not data:
                self.close_out(call, fd)
            elif not call.orphaned:
                call.credit -= len(data)
                self.send(call.out_fds[fd], call.chan, data)
        self.maybe_finish(call)


# --- a restored boot state ------------------------------------------------------
RC_QUBE = "/usr/lib/bulkhead/rc.qube"
RC_SHUTDOWN = "/usr/lib/bulkhead/rc.shutdown"
RNDADDENTROPY = 0x40085203   # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207       # _IO('R', 0x07)
BLKFLSBUF = 0x1261           # _IO(0x12, 97)


def _saved_boot():
    try:
        with open("/proc/cmdline") as f:
            return "bulkhead.saved=1" in f.read().split()
    except OSError:
        return False


def reseed(seed):
    """Mix dom0's fresh bytes into the kernel's pool, credited, and make the CRNG rekey
    now: every qube restored from one saved state had the same pool until here."""
    import fcntl   # lazily: only a restored qube pays for it
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
    import fcntl
    import socket
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
    import fcntl
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


NETCONF_SERVICE = "bulkhead.NetConfig"


def _netconf_main():
    """In a forked child: apply the network configuration on stdin (imported here only)."""
    from . import netconf  # noqa: PLC0415 -- only when dom0 configures the network
    return netconf.main()


FILECOPY_SERVICE = "/etc/qubes-rpc/qubes.Filecopy"


def _filecopy_main():
    """In a forked child, as the user: the qubes.Filecopy unpacker (what that file runs)."""
    from . import filecopy  # noqa: PLC0415 -- only a qube that is sent files needs it
    code = 1
    try:
        code = filecopy.unpacker_main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _plain(word):
    return bool(word) and all(c.isascii() and (c.isalnum() or c in "._-") for c in word)


def _is_sh_script(path):
    """An executable ``#!/bin/sh`` script, whose name and arguments are plain words
    (service names, qube names: checked by the protocol), so safe in a shell line."""
    if not os.access(path, os.X_OK) or not all(c.isalnum() or c in "/._+-" for c in path):
        return False
    try:
        with open(path, "rb") as f:
            return f.readline(64).rstrip() == b"#!/bin/sh"
    except OSError:
        return False


def _mode(path):
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def socket_relay(path, header):
    """In a forked child: join stdin/stdout to a socket service; 0 when it hangs up."""
    import socket  # noqa: PLC0415 -- only socket services need it

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(header)
    except OSError as e:
        os.write(2, ("cannot connect to %s: %s\n" % (path, e)).encode())
        return 127
    sock = s.fileno()
    open_in = True
    while True:
        for fd in _readable([0] if open_in else [], sock):
            data = os.read(fd, READ_CHUNK)
            if fd == sock:
                if not data:
                    return 0
                _write_all(1, data)
            elif data:
                s.sendall(data)
            else:
                open_in = False
                s.shutdown(socket.SHUT_WR)


def _readable(fds, sock):
    poller = select.poll()
    for fd in fds + [sock]:
        poller.register(fd, POLLIN)
    return [fd for fd, _ in poller.poll()]


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


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
