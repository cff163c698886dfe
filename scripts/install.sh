#!/usr/bin/env bash
# README command (a): install Bulkhead, set everything up, start the daemon, show the qubes.
# Idempotent: run it again and it only checks (seconds).
source "$(dirname "$0")/bootstrap.sh"
# The tools on root's PATH, as Qubes has them in dom0.
for tool in "$BULKHEAD_VENV"/bin/bulkhead "$BULKHEAD_VENV"/bin/qvm-* "$BULKHEAD_VENV"/bin/qubes-prefs \
            "$BULKHEAD_VENV"/bin/qrexec-*; do
    ln -sf "$tool" "/usr/local/bin/$(basename "$tool")"
done
# dom0's qrexec-client where Qubes' tools look for it.
mkdir -p /usr/lib/qubes
ln -sf "$BULKHEAD_VENV/bin/qrexec-client" /usr/lib/qubes/qrexec-client
exec bulkhead setup "$@"
