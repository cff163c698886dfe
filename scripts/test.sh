#!/usr/bin/env bash
# README command (b): the test suite.  Builds (or finds cached) the qube kernel and
# the template image, then runs every test; the VM tests start their own daemon
# with their own $BULKHEAD_HOME and socket.
source "$(dirname "$0")/bootstrap.sh"
export BULKHEAD_CACHE=${BULKHEAD_CACHE:-/var/cache/bulkhead}
# Kernel and template are built once per machine and shared by every test instance.
BULKHEAD_HOME=${BULKHEAD_TEST_PREP_HOME:-/var/lib/bulkhead-test-prep} bulkhead prepare
cd "$repo"
exec python -m pytest -q "$@"
