"""How the agent starts a call's process: as which user, with which pipes.

Each returns ``(pid, pidfd, stdin_w, stdout_r, stderr_r, control_w)``, the parent's
ends non-blocking.  Under TCG a fork of the agent (copying its page tables) costs
5-70 ms, so what can be started with posix_spawn (vfork) is: rc.qube and the spare
shells that commands and ``#!/bin/sh`` services run in.
"""

import os
import pwd

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Commands run with Debian's /bin/sh, as Qubes' agent runs them.  (Busybox's
# static shell would start faster under TCG, but it runs its own applets in
# place of the real programs: `dpkg` would be busybox's.)
SHELL = ("/bin/sh", "sh")
# A spare shell waits on fd 3 for its script (see Agent.prespawn).
SPARE_ARGV = ["sh", "-c", ". /proc/self/fd/3"]
# --- GUI (issue 10): in a qube with a GUI agent, commands find its X server (as in Qubes).
try:
    with open("/proc/cmdline") as _f:
        GUI_ENV = {"DISPLAY": ":0"} if "bulkhead.gui=1" in _f.read().split() else {}
except OSError:
    GUI_ENV = {}


def spawn(user, path, argv, extra_env, control=False, run=None):
    """Fork and exec ``argv`` as ``user`` with fresh stdin/stdout/stderr pipes.

    With ``control``, the child also gets a pipe on fd 3 and the result
    holds its write end (the agent's spare shells).  Returns
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

def spawn_spare(user):
    """A spare shell for ``user``, started with posix_spawn (vfork: no copy of this
    process' page tables, which costs 5-20 ms under TCG and held up calls).

    posix_spawn cannot switch users, so for the spawn this process takes the
    user's groups and *real* ids, keeping effective and saved root;
    ``resetids`` makes the child's effective ids the real ones, and its exec of
    the shell makes the saved ids the same: the shell has nothing of root.
    Then this process takes its own back (it is single-threaded: nothing else
    runs meanwhile; for that instant the user's processes could signal it, as
    they could any process of theirs -- within the qube, whose user it is).
    Returns what :func:`spawn` returns; KeyError for an unknown user.
    """
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return spawn(user, SHELL[0], SPARE_ARGV,
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
        pid = os.posix_spawn(SHELL[0], SPARE_ARGV, env, setsid=True, resetids=True,
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

def spawn_root(path, argv):
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
