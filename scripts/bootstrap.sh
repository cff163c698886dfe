# Shared by install.sh and test.sh (sourced, not run): a virtual environment with
# Bulkhead installed from this checkout, on a fresh Debian 12, as root.
set -eu
BULKHEAD_VENV=${BULKHEAD_VENV:-/opt/bulkhead/venv}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "Bulkhead runs qubes as root (QEMU, network namespaces): run this as root." >&2
    exit 1
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "installing python3-venv (Debian's Python needs it for a virtual environment)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi
if [ ! -x "$BULKHEAD_VENV/bin/python" ]; then
    echo "creating the virtual environment $BULKHEAD_VENV"
    python3 -m venv "$BULKHEAD_VENV"
fi
# Reinstall only when the project's metadata changed (the install is editable).
stamp="$BULKHEAD_VENV/.bulkhead-installed"
want=$(sha256sum "$repo/pyproject.toml" | cut -c1-16)-$repo
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$BULKHEAD_VENV/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
    echo "$want" > "$stamp"
fi
# Compiled bytecode: without it every qvm-* command recompiles the client (~20 ms),
# and some environments (PYTHONDONTWRITEBYTECODE) never write it themselves.
"$BULKHEAD_VENV/bin/python" -m compileall -q "$repo/src" >/dev/null
export PATH="$BULKHEAD_VENV/bin:$PATH"
