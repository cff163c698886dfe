"""``bulkhead.vm.volume.ImportFile``: replace a volume with a disk image on dom0's filesystem.

Qubes' ``admin.vm.volume.Import`` streams a volume's raw bytes through the
socket; a template root is 10 GiB of mostly zeros, and ``bulkhead setup``
already has it as a compact qcow2 on the same disk.  This extension takes the
image's path instead.  Only dom0 can call the Admin API, and dom0 already has
that file; the path is still checked (absolute, a regular file) and read only
by ``qemu-img``, never through a shell.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ProtocolError, QubesValueError, QubesVMNotHaltedError
from .admin_volume import _storage, _volume
from .registry import Call, method

MAX_PATH = 4096


@method("bulkhead.vm.volume.ImportFile", dest="vm", arg=True, payload=True, max_payload=MAX_PATH)
async def volume_import_file(call: Call) -> None:
    volume = _volume(call)
    untrusted_path = call.untrusted_payload.decode("utf-8", "strict") \
        if call.untrusted_payload.isascii() else None
    if not untrusted_path or not untrusted_path.startswith("/") or "\0" in untrusted_path:
        raise ProtocolError("the payload must be the absolute path of a disk image")
    path = Path(untrusted_path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise QubesValueError(f"cannot read the image {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise QubesValueError(f"{path} is not a regular file")
    if not call.dest.is_halted():
        raise QubesVMNotHaltedError(call.dest)
    await _storage("Import", volume.import_data(path))
    with call.app.transaction():
        call.app.save_volume_config(call.dest)
