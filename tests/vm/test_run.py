"""qvm-run against a real qube: output, users, stdin, exit codes, volume of data, concurrency."""

from __future__ import annotations

import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.vm


def test_setup_ends_with_qvm_ls_of_the_default_qubes(bulkhead):
    lines = bulkhead.setup_output.splitlines()
    header = [i for i, line in enumerate(lines) if line.split()[:6] ==
              ["NAME", "STATE", "CLASS", "LABEL", "TEMPLATE", "NETVM"]]
    assert header, bulkhead.setup_output
    table = {line.split()[0]: line.split() for line in lines[header[-1] + 1:] if line.strip()}
    assert table["dom0"][1:3] == ["Running", "AdminVM"]
    assert table["debian-12"][2] == "TemplateVM"
    for name, label in [("work", "blue"), ("personal", "yellow"), ("untrusted", "red"),
                        ("vault", "black"), ("sys-net", "red"), ("sys-firewall", "green"),
                        ("default-dvm", "red")]:
        assert table[name][2:5] == ["AppVM", label, "debian-12"], table[name]
    assert table["vault"][5] == "-"
    assert table["work"][5] == "sys-firewall"
    assert table["sys-firewall"][5] == "sys-net"


def test_echo_and_user(bulkhead, work):
    r = bulkhead.run(work, "echo hello; id -un")
    assert r.stdout == "hello\nuser\n"


def test_run_as_root(bulkhead, work):
    assert bulkhead.run(work, "id -un", user="root").stdout == "root\n"


def test_stdin_is_passed(bulkhead, work):
    assert bulkhead.run(work, "cat", input="data\n").stdout == "data\n"


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_code_is_qvm_runs(bulkhead, work, code):
    r = bulkhead.run(work, f"exit {code}", check=False)
    assert r.returncode == code


def test_stderr_is_separate(bulkhead, work):
    r = bulkhead.run(work, "echo out; echo err >&2")
    assert r.stdout == "out\n"
    assert "err" in r.stderr


def test_megabytes_both_ways_arrive_intact(bulkhead, work):
    """More data than the flow-control window in both directions at once."""
    data = os.urandom(3 * 1024 * 1024)
    r = bulkhead.tool("qvm-run", "-p", work, "tee /tmp/copy | sha256sum; cat /tmp/copy",
                      input=data, text=False, timeout=300)
    digest, _, echoed = r.stdout.partition(b"\n")
    assert digest.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert echoed == data


def test_many_calls_at_once(bulkhead, work):
    def one(i: int) -> str:
        return bulkhead.run(work, f"sleep 0.5; echo call-{i}").stdout
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, range(8)))
    assert outputs == [f"call-{i}\n" for i in range(8)]


def test_unknown_qube_is_one_clear_error(bulkhead):
    r = bulkhead.tool("qvm-run", "-p", "no-such-qube", "true", check=False)
    assert r.returncode != 0
    assert "no-such-qube" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_user_fails_cleanly(bulkhead, work):
    r = bulkhead.run(work, "true", user="nobody-here", check=False)
    assert r.returncode != 0
    assert "nobody-here" in r.stderr


def test_client_interrupt_reaches_the_command(bulkhead, work):
    """Closing qvm-run hangs the command up instead of leaving it running."""
    proc = subprocess.Popen([str(bulkhead.env["PATH"].split(":")[0] + "/qvm-run"), "-p", work,
                             "echo started; sleep 300; echo not-killed"],
                            env=bulkhead.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    proc.kill()
    proc.wait()
    # The command got SIGHUP: no sleep 300 is left.
    for _ in range(50):
        r = bulkhead.run(work, "pgrep -f 'sleep 30[0]' || true", user="root")
        if not r.stdout.strip():
            break
        subprocess.run(["sleep", "0.2"])
    assert not r.stdout.strip()
