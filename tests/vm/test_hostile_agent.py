"""A qube that feeds garbage into its agent channel loses that channel, nothing more."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.vm

# Run as root inside the qube: stop the agent, seize its virtio-serial port before
# init restarts it, write PAYLOAD (printf escapes), let go.  Detached, so that
# qvm-run returns before the link breaks.
SEIZE = r"""
port=
for d in /sys/class/virtio-ports/*; do
  [ "$(cat $d/name)" = org.qubes-os.qrexec ] && port=/dev/${d##*/}
done
setsid sh -c '
  sleep 1
  pkill -f "qrexec-agen[t]"
  for i in $(seq 300); do exec 3<>'"$port"' 2>/dev/null && break; sleep 0.01; done
  printf "%b" "PAYLOAD" >&3
  sleep 1
  exec 3>&-
' </dev/null >/dev/null 2>&1 &
echo seized
"""

PAYLOADS = {
    # not a frame at all
    "garbage": r"\x13\x37garbage that is not a frame\xff\xfe\x00\x01" * 4,
    # a STDOUT header announcing 4 GiB
    "oversized": r"\x04\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff",
    # a well-formed header for a channel dom0 never opened, its payload cut short
    "truncated": r"\x04\x00\x00\x00\x09\x00\x00\x00\x00\x01\x00\x00partial",
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_garbage_closes_only_that_channel(bulkhead, scratch_qube, kind):
    q = scratch_qube
    bulkhead.tool("qvm-start", "--skip-if-running", q)
    bulkhead.ensure_running("sys-net")
    log_before = len(bulkhead.daemon_log())
    out = bulkhead.run(q, SEIZE.replace("PAYLOAD", PAYLOADS[kind]), user="root").stdout
    assert out == "seized\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new_log = bulkhead.daemon_log()[log_before:]
        if f"qube {q}: protocol violation" in new_log or "link to the guest agent closed" in new_log:
            break
        time.sleep(0.2)
    new_log = bulkhead.daemon_log()[log_before:]
    assert f"qube {q}: protocol violation from the guest agent" in new_log, new_log
    # The daemon lives on and serves other qubes...
    assert bulkhead.run("sys-net", "echo still-serving").stdout == "still-serving\n"
    assert bulkhead.state(q) == "Running"
    # ...and this qube too, once its agent (restarted by init) says HELLO again.
    assert bulkhead.run(q, "echo reconnected").stdout == "reconnected\n"
