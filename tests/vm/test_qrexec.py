"""qrexec between real qubes: calls routed by dom0 under its policy, file copy with its
hostile-sender checks, ``ask`` answered through the Admin API."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import pytest

pytestmark = pytest.mark.vm

ECHO_SERVICE = r"""#!/bin/sh
printf 'from=%s arg=%s name=%s\n' "$QREXEC_REMOTE_DOMAIN" "$QREXEC_SERVICE_ARGUMENT" \
    "$QREXEC_SERVICE_FULL_NAME"
echo "$QREXEC_REMOTE_DOMAIN" > /tmp/last-caller
cat
exit 7
"""

TEST_POLICY = """\
test.Echo * work personal allow
test.Echo * @anyvm @anyvm deny
"""


def policy_dir(bulkhead):
    d = bulkhead.home / "policy.d"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def two(bulkhead):
    """work and personal running, personal with the test's service, the test's policy."""
    (policy_dir(bulkhead) / "10-test.policy").write_text(TEST_POLICY)
    bulkhead.ensure_running("work")
    bulkhead.ensure_running("personal")
    bulkhead.run("personal", "mkdir -p /usr/local/etc/qubes-rpc && "
                             "cat > /usr/local/etc/qubes-rpc/test.Echo && "
                             "chmod +x /usr/local/etc/qubes-rpc/test.Echo",
                 user="root", input=ECHO_SERVICE)
    yield
    (policy_dir(bulkhead) / "10-test.policy").unlink(missing_ok=True)


def qrexec(bulkhead, qube, target, service, stdin="", local=""):
    return bulkhead.run(qube, f"qrexec-client-vm {target} {service} {local}; echo rc=$?",
                        input=stdin, check=False)


def test_an_allowed_call_joins_the_two_qubes(bulkhead, two):
    r = qrexec(bulkhead, "work", "personal", "test.Echo+some-arg", stdin="hello\n")
    assert r.stdout == ("from=work arg=some-arg name=test.Echo+some-arg\nhello\nrc=7\n"), r
    log = (bulkhead.home / "log" / "qrexec.log").read_text()
    assert "allow source=work target=personal service=test.Echo argument=some-arg" in log


def test_the_client_filters_escapes_runs_a_local_program_and_checks_its_arguments(bulkhead, two):
    # -t: the service's escape characters reach this terminal as "_"
    r = bulkhead.run("work", "printf '\\033[2Jdone\\n' | qrexec-client-vm -t personal test.Echo; "
                             "echo rc=$?", check=False)
    assert r.stdout.endswith("_[2Jdone\nrc=7\n"), r
    # LOCAL_PROGRAM: its stdout is the call's input, the service's output its stdin;
    # its failure is the call's exit code
    r = qrexec(bulkhead, "work", "personal", "test.Echo",
               local="sh -c 'echo to-service; exec >&-; cat > /tmp/from-service; exit 3'")
    assert r.stdout == "rc=3\n", r
    assert bulkhead.run("work", "cat /tmp/from-service").stdout.endswith("to-service\n")
    r = qrexec(bulkhead, "work", "personal", "")
    assert r.stdout == "rc=2\n" and "TARGET and SERVICE are needed" in r.stderr, r


def test_a_calls_pipes_reach_no_other_process_of_the_agent(bulkhead, two):
    # A call in flight; then commands, for which the agent starts new spare shells.
    # None may inherit the client's pipes (that kept them open after the call).
    bulkhead.run("work", "(sleep 30 | qrexec-client-vm personal test.Echo) "
                         ">/dev/null 2>&1 </dev/null & sleep 2")
    for _ in range(2):
        bulkhead.run("work", "true")
    holders = bulkhead.run("work", r"""
        c=$(pgrep -x qrexec-client-v); pipe=$(readlink /proc/$c/fd/0)
        for p in /proc/[0-9]*; do
            [ "$(cat $p/comm)" = qrexec-agent ] && continue     # it relays the call
            for f in $p/fd/*; do
                [ "$(readlink $f)" = "$pipe" ] && cat $p/comm && break
            done
        done 2>/dev/null; pkill -x sleep; true""", user="root").stdout
    assert sorted(holders.split()) == ["qrexec-client-v", "sleep"], holders


def test_a_denied_call_reaches_nobody_and_says_so(bulkhead, two):
    bulkhead.ensure_running("untrusted")
    bulkhead.run("personal", "rm -f /tmp/last-caller", user="root")
    r = qrexec(bulkhead, "untrusted", "personal", "test.Echo")
    assert r.stdout.endswith("rc=126\n"), r
    assert "Request refused" in r.stderr
    assert bulkhead.run("personal", "cat /tmp/last-caller 2>/dev/null; true").stdout == ""
    assert "deny source=untrusted target=personal service=test.Echo" in \
        (bulkhead.home / "log" / "qrexec.log").read_text()


def test_untrusted_cannot_run_a_shell_in_work(bulkhead, two):
    bulkhead.ensure_running("untrusted")
    r = qrexec(bulkhead, "untrusted", "work", "qubes.VMShell", stdin="touch /tmp/owned\n")
    assert r.stdout.endswith("rc=126\n"), r
    assert bulkhead.run("work", "test -e /tmp/owned && echo owned || echo safe").stdout == "safe\n"


def test_a_broken_policy_file_denies_every_call(bulkhead, two):
    broken = policy_dir(bulkhead) / "05-broken.policy"
    broken.write_text("test.Echo * work personal allow\nthis line is not a rule\n")
    try:
        r = qrexec(bulkhead, "work", "personal", "test.Echo")
        assert r.stdout.endswith("rc=126\n"), r
        assert "05-broken.policy:2" in (bulkhead.home / "log" / "qrexec.log").read_text()
    finally:
        broken.unlink()
    r = qrexec(bulkhead, "work", "personal", "test.Echo", stdin="back\n")
    assert r.stdout.endswith("back\nrc=7\n"), r


# --- file copy --------------------------------------------------------------------------------

@contextlib.contextmanager
def answering(bulkhead, answer: str) -> Iterator[None]:
    """While the block runs, answer every pending ``ask`` through the Admin API, as a
    prompt would."""
    from bulkhead.client.connection import Connection

    stop = threading.Event()

    def loop() -> None:
        conn = Connection(str(bulkhead.socket))
        while not stop.is_set():
            reply = conn.request("dom0", "bulkhead.qrexec.AskList")
            assert reply.startswith(b"0\0"), reply
            for line in reply[2:].decode().splitlines():
                qid = line.split()[0]
                conn.request("dom0", "bulkhead.qrexec.AskAnswer", qid, answer.encode())
            time.sleep(0.2)
    threading.Thread(target=loop, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def test_qvm_copy_asked_and_allowed_lands_byte_identical(bulkhead, two):
    bulkhead.run("work", "head -c 100000000 /dev/urandom > /home/user/big.bin && "
                         "sha256sum < /home/user/big.bin > /home/user/big.sum")
    bulkhead.run("personal", "rm -rf /home/user/QubesIncoming/work")
    with answering(bulkhead, "allow personal"):
        r = bulkhead.tool("qvm-run", "-p", "work", "qvm-copy-to-vm personal /home/user/big.bin",
                          check=False, timeout=600)
    assert r.returncode == 0, r.stderr
    want = bulkhead.run("work", "cat /home/user/big.sum").stdout
    got = bulkhead.run("personal", "sha256sum < /home/user/QubesIncoming/work/big.bin").stdout
    assert got == want


FIND_DATA_DISK = ("for d in /sys/block/*; do [ \"$(cat $d/serial 2>/dev/null)\" = qrexec-data ] "
                  "&& echo ${d##*/}; done; true")


def sectors(bulkhead, qube, disk) -> tuple[int, int]:
    """(sectors read, sectors written) of a qube's disk, from its own /sys/block stat."""
    fields = bulkhead.run(qube, f"cat /sys/block/{disk}/stat").stdout.split()
    return int(fields[2]), int(fields[6])


def test_a_copy_leaves_the_sender_and_enters_the_target_through_their_data_disks(bulkhead, two):
    # The bulk bytes travel on the qubes' data disks (DATA frames say where), not in
    # frames on virtio-serial: the sender writes its input into its own area of its
    # disk, dom0 moves it into the target's, the target reads it there.
    disks = {q: bulkhead.run(q, FIND_DATA_DISK).stdout.strip() for q in ("work", "personal")}
    assert all(disks.values()), f"one NIC leaves a transport to spare: {disks}"
    # No I/O scheduler on a qube's disks (the agent drops it once the qube is up).
    schedulers = bulkhead.run("personal", "for i in $(seq 50); do cat /sys/block/vd*/queue/"
                              "scheduler | grep -qv '\\[none\\]' || break; sleep 0.2; done; "
                              "cat /sys/block/vd*/queue/scheduler").stdout.split("\n")
    assert all("[none]" in line for line in schedulers if line), schedulers
    bulkhead.run("work", "head -c 20000000 /dev/urandom > /home/user/mid.bin && "
                         "sha256sum < /home/user/mid.bin > /home/user/mid.sum")
    bulkhead.run("personal", "rm -rf /home/user/QubesIncoming/work")
    (policy_dir(bulkhead) / "09-copy.policy").write_text("qubes.Filecopy * work personal allow\n")
    try:
        before = {q: sectors(bulkhead, q, d) for q, d in disks.items()}
        r = bulkhead.run("work", "qvm-copy-to-vm personal /home/user/mid.bin", check=False)
        assert r.returncode == 0, r
        after = {q: sectors(bulkhead, q, d) for q, d in disks.items()}
    finally:
        (policy_dir(bulkhead) / "09-copy.policy").unlink()
    written = (after["work"][1] - before["work"][1]) * 512
    read = (after["personal"][0] - before["personal"][0]) * 512
    # (All but a last read under 4 KiB, which goes by frame as interactive input does.)
    assert written >= 20000000 - 4096, f"only {written} bytes went out through work's data disk"
    assert read >= 20000000, f"only {read} bytes were read from personal's data disk"
    assert bulkhead.run("personal", "sha256sum < /home/user/QubesIncoming/work/mid.bin").stdout \
        == bulkhead.run("work", "cat /home/user/mid.sum").stdout
    # dom0's input to a command goes the same way, in order, byte for byte.
    data = "".join(f"{i:07d}\n" for i in range(200000))
    assert bulkhead.run("personal", "sha256sum", input=data).stdout.split()[0] == \
        __import__("hashlib").sha256(data.encode()).hexdigest()


def test_a_qube_without_a_transport_to_spare_keeps_the_frames(bulkhead, two):
    # microvm has 8 virtio-mmio transports: 3 disks, virtio-serial, rng, balloon and
    # one per NIC.  A netvm with two NICs has none left: no data disk, same service.
    bulkhead.ensure_running("sys-firewall")
    nics = int(bulkhead.run("sys-firewall", "ls /sys/class/net | grep -vc '^lo$'").stdout)
    disk = bulkhead.run("sys-firewall", FIND_DATA_DISK).stdout.strip()
    assert bool(disk) == (3 + nics + 3 < 8), (nics, disk)
    data = "x" * 300000 + "end\n"
    assert bulkhead.run("sys-firewall", "wc -c", user="root", input=data).stdout.strip() \
        == str(len(data))


def test_qvm_copy_denied_delivers_nothing(bulkhead, two):
    bulkhead.run("work", "echo secret > /home/user/small.txt")
    bulkhead.run("personal", "rm -rf /home/user/QubesIncoming/work")
    with answering(bulkhead, "deny"):
        r = bulkhead.tool("qvm-run", "-p", "work", "qvm-copy-to-vm personal /home/user/small.txt",
                          check=False, timeout=120)
    assert r.returncode != 0
    assert "Request refused" in r.stderr
    assert bulkhead.run("personal", "ls /home/user/QubesIncoming/work 2>/dev/null | wc -l"
                        ).stdout.strip() == "0"


HOSTILE_SENDER = r"""
import os, sys
def entry(kind, name, size, mode=0o644):
    return kind + len(name).to_bytes(2, "little") + mode.to_bytes(4, "little") + \
        size.to_bytes(8, "little") + name
case = sys.argv[1]
out = os.fdopen(1, "wb")
out.write(b"BHFC1\n")
if case == "traversal":
    out.write(entry(b"F", b"../escaped-traversal", 2) + b"hi")
elif case == "absolute":
    out.write(entry(b"F", b"/tmp/escaped-absolute", 2) + b"hi")
elif case == "symlink":
    out.write(entry(b"D", b"d", 0, 0o755))
    out.write(entry(b"L", b"d/out", 9) + b"../../../")
    out.write(entry(b"F", b"d/out/escaped-symlink", 2) + b"hi")
elif case == "through-symlink":
    out.write(entry(b"L", b"ok", 1) + b".")
    out.write(entry(b"F", b"ok/escaped-through", 2) + b"hi")
elif case == "device":
    out.write(entry(b"B", b"escaped-device", 0))
elif case == "huge-name":
    out.write(entry(b"F", b"x" * 300, 2) + b"hi")
elif case == "endless":
    out.write(entry(b"F", b"endless", 10**12))
    block = b"z" * 65536
    try:
        while True:
            out.write(block)
    except BrokenPipeError:
        sys.stderr.write(sys.stdin.read())
        sys.exit(0)
try:
    out.write(b"E")
    out.flush()
    os.close(1)
except BrokenPipeError:
    pass
sys.stderr.write(sys.stdin.read())
"""


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "through-symlink",
                                  "device", "huge-name", "endless"])
def test_a_hostile_sender_lands_nothing_outside_the_incoming_folder(bulkhead, two, case):
    (policy_dir(bulkhead) / "09-filecopy-test.policy").write_text(
        "qubes.Filecopy * work personal allow\n")
    bulkhead.run("personal", "mkdir -p /usr/local/etc/bulkhead && "
                             "echo 1048576 > /usr/local/etc/bulkhead/filecopy-limit", user="root")
    bulkhead.run("personal", "rm -rf /home/user/QubesIncoming /tmp/escaped-*")
    bulkhead.run("work", "cat > /tmp/hostile-sender.py", input=HOSTILE_SENDER)
    r = bulkhead.run("work", f"qrexec-client-vm personal qubes.Filecopy python3 "
                             f"/tmp/hostile-sender.py {case}; echo rc=$?", check=False)
    assert "rc=1\n" in r.stdout, (r.stdout, r.stderr)
    assert "ERROR: refused" in r.stderr, r.stderr
    escaped = bulkhead.run("personal", "find / -xdev -name 'escaped-*' "
                                       "-not -path '/home/user/QubesIncoming/work/*' "
                                       "2>/dev/null; true", user="root").stdout
    assert escaped == ""
    (policy_dir(bulkhead) / "09-filecopy-test.policy").unlink()


def test_work_runs_a_shell_in_a_disposable_that_then_goes(bulkhead, two):
    r = qrexec(bulkhead, "work", "@dispvm", "qubes.VMShell",
               stdin="echo from-$(hostname)\necho $QREXEC_REMOTE_DOMAIN\n")
    assert r.stdout.endswith("rc=0\n"), r
    first = r.stdout.splitlines()[0]
    assert first.startswith("from-disp") and r.stdout.splitlines()[1] == "work", r.stdout
    name = first.removeprefix("from-")
    deadline = time.monotonic() + 60
    while name in bulkhead.tool("qvm-ls", "--raw-list").stdout.split():
        assert time.monotonic() < deadline, f"{name} still listed"
        time.sleep(0.5)
    leftovers = [p for p in (bulkhead.home / "pools").rglob(f"*{name}*")]
    assert leftovers == []


def test_a_qube_calls_the_admin_api_only_as_the_policy_allows(bulkhead, two):
    r = qrexec(bulkhead, "work", "dom0", "admin.vm.List")
    assert r.stdout.endswith("rc=126\n"), r                    # denied by default
    rule = policy_dir(bulkhead) / "08-admin-test.policy"
    rule.write_text("admin.vm.List * work @adminvm allow target=dom0\n"
                    "bulkhead.vm.Run * work @anyvm allow target=dom0\n")
    try:
        r = qrexec(bulkhead, "work", "dom0", "admin.vm.List")
        assert r.stdout.startswith("0\0") and "\nwork class=AppVM state=Running\n" in \
            "\n" + r.stdout[2:], r
        assert r.stdout.endswith("rc=0\n")
        # Bulkhead's own methods stay dom0's, whatever a policy line says.
        r = qrexec(bulkhead, "work", "personal", "bulkhead.vm.Run")
        assert r.stdout.endswith("rc=126\n"), r
    finally:
        rule.unlink()


def test_dom0_qrexec_client_runs_commands_and_services_as_qubes_does(bulkhead, two, tmp_path):
    r = bulkhead.tool("qrexec-client", "-d", "personal", "user:echo $USER; exit 3", check=False)
    assert (r.returncode, r.stdout) == (3, "user\n"), r
    r = bulkhead.tool("qrexec-client", "-d", "personal", "DEFAULT:QUBESRPC test.Echo+xy work",
                      input="in\n", check=False)
    assert (r.returncode, r.stdout) == (7, "from=work arg=xy name=test.Echo+xy\nin\n"), r
    got = tmp_path / "got"
    r = bulkhead.tool("qrexec-client", "-d", "personal", "-l",
                      f"exec sh -c 'echo local-data; exec 1>&-; cat > {got}'", "user:cat",
                      check=False, timeout=60)
    assert r.returncode == 0, r
    assert got.read_text() == "local-data\n"


OPENER = "#!/bin/sh\necho \"edited in $(hostname)\" >> \"$1\"\n"


def test_open_in_vm_and_in_a_disposable_brings_changes_back(bulkhead, two):
    bulkhead.run("personal", "mkdir -p /usr/local/bin && cat > /usr/local/bin/qubes-open && "
                             "chmod +x "
                             "/usr/local/bin/qubes-open", user="root", input=OPENER)
    bulkhead.run("work", "echo original > /home/user/doc.txt")
    with answering(bulkhead, "allow personal"):
        r = bulkhead.tool("qvm-run", "-p", "work", "qvm-open-in-vm personal /home/user/doc.txt",
                          check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    assert bulkhead.run("work", "cat /home/user/doc.txt").stdout == \
        "original\nedited in personal\n"
    # The disposable template's own files are in every disposable made from it.
    bulkhead.run("default-dvm", "mkdir -p /usr/local/bin && cat > /usr/local/bin/qubes-open && "
                                "chmod +x "
                                "/usr/local/bin/qubes-open", user="root", input=OPENER)
    bulkhead.tool("qvm-shutdown", "--wait", "default-dvm", timeout=120)
    r = bulkhead.run("work", "qvm-open-in-dvm --view-only /home/user/doc.txt", check=False)
    assert r.returncode == 0, r.stderr
    assert bulkhead.run("work", "cat /home/user/doc.txt").stdout == \
        "original\nedited in personal\n"                          # view-only: nothing back
    r = bulkhead.run("work", "qvm-open-in-dvm /home/user/doc.txt", check=False)
    assert r.returncode == 0, r.stderr
    lines = bulkhead.run("work", "cat /home/user/doc.txt").stdout.splitlines()
    assert lines[:2] == ["original", "edited in personal"] and lines[2].startswith("edited in disp")


def test_get_date_from_dom0_and_vmexec_in_a_disposable(bulkhead, two):
    r = qrexec(bulkhead, "work", "@default", "qubes.GetDate")   # as qvm-sync-clock asks
    assert r.stdout.endswith("+00:00\nrc=0\n") and r.stdout[:2] == "20", r
    # qubes.VMExec: the argument is the command line in Qubes' encoding ("-20" a space)
    r = qrexec(bulkhead, "work", "@dispvm", "qubes.VMExec+echo+hello-20world--x")
    assert r.stdout == "hello world-x\nrc=0\n", r


SOCKET_SERVER = r"""
import os, socket
path = "/usr/local/etc/qubes-rpc/test.Sock"
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o666)
s.listen(1)
conn, _ = s.accept()
buf = b""
while b"\0" not in buf:
    buf += conn.recv(100)
header, _, rest = buf.partition(b"\0")
data = rest
while True:
    d = conn.recv(4096)
    if not d:
        break
    data += d
conn.sendall(b"header=" + header + b" data=" + data)
conn.close()
"""


def test_a_socket_service_gets_qubes_header_and_the_data(bulkhead, two):
    (policy_dir(bulkhead) / "07-sock-test.policy").write_text("test.Sock * work personal allow\n")
    try:
        bulkhead.run("personal", "mkdir -p /usr/local/etc/qubes-rpc && "
                                 "cat > /tmp/sock-server.py", user="root", input=SOCKET_SERVER)
        bulkhead.run("personal", "setsid python3 /tmp/sock-server.py </dev/null >/dev/null 2>&1 & "
                                 "for i in $(seq 100); do [ -S /usr/local/etc/qubes-rpc/test.Sock ]"
                                 " && break; sleep 0.1; done", user="root")
        r = qrexec(bulkhead, "work", "personal", "test.Sock+a1", stdin="payload")
        assert r.stdout == "header=test.Sock+a1 work data=payloadrc=0\n", r
    finally:
        (policy_dir(bulkhead) / "07-sock-test.policy").unlink()
