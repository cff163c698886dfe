"""Saved boot states: a qube started by restoring a boot saved once, not by booting.

Under TCG most of a cold start is the guest's first Python start (the agent);
a restore skips all of it.  For each template root (and each machine shape:
memory, vCPUs, kernel, command line, devices) dom0 boots one machine, under no
qube's name, until its kernel runs, root is mounted and the agent is ready --
but before any per-qube volume is read (``bulkhead.saved=1``: rc.sysinit stops
before rc.qube) -- and saves it with QEMU's migration stream.  A start then:

1. gives the qube a fresh root overlay on the state's *frozen root* (the overlay
   the saved boot wrote into, itself on the template root's committed image
   that the state was built from), its own private and a fresh volatile;
2. launches QEMU with the saved boot's command line and ``-incoming defer``,
   connects to the agent's port *before* the state loads (so the guest never
   sees its port close and the saved agent needs no new HELLO), loads the state;
3. tells QEMU the private and volatile disks' real sizes (a resize notification
   makes the guest's kernel re-read each capacity: it had probed 1 MiB
   placeholders) and continues the machine;
4. sends RESUME: the agent mixes 64 fresh bytes from dom0 into the kernel's
   pool and forces a CRNG reseed, drops every cached sector of the placeholder
   disks, then runs ``rc.qube NAME``: hostname, private volume, rc.local.  The
   qube counts as started when that call exits 0.

What restored qubes share: the layout in memory of what ran at save time
(kernel, init, the agent -- ASLR was decided once, at the saved boot) and the
agent's Python hash seed.  What is renewed: the kernel RNG (before any of the
qube's own code runs), the name, the volumes, and every process started after
the restore.

A state is an artifact like the kernel and the template image: built on
demand in the background (the first start of its kind boots cold), kept until
an input changes.  Its key digests every input -- the template root's committed
image (image names are never reused for other content, see
:mod:`bulkhead.storage.file_volume`), the kernel and QEMU binaries, the
acceleration and QEMU's device list -- so a stale state is never even looked
up.  Where it is kept: a template root that is an unchanged import of the
template image in the build cache (``$BULKHEAD_CACHE/templates/``) has that
image's content, so its states are built on that image and kept beside it in
``$BULKHEAD_CACHE/boot-states/``, shared by every instance on the host (the
README's setup and the tests' instances alike); a root the template changed
since has its states in ``$BULKHEAD_HOME/boot-states/``.  Its file's SHA-256 is checked before its first use by
a daemon and whenever the file changed since: a damaged state is discarded and
rebuilt, never restored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import datadisk
from .backend import jail
from .backend.base import DiskSpec, MachineSpec
from .backend.qemu_argv import QEMU, build_argv
from .errors import BackendError, QubesException
from .guest import protocol as P
from .storage import qemu_img

if TYPE_CHECKING:  # pragma: no cover
    from .agentlink import AgentLink
    from .backend.base import Backend, Machine

log = logging.getLogger(__name__)

FORMAT = "2"                       # bump when what a state holds, or how it is made, changes
PLACEHOLDER_BYTES = 1024 * 1024    # the private and volatile disks the saved boot sees
STATE_FILE = "state"
ROOT_FILE = "root.qcow2"
META_FILE = "meta.json"
#: the jail's qid for machines that build a state: above every qube's (MAX_QID 254)
BUILDER_QID = 255
#: how long the saved boot may take to reach a ready agent
BUILD_TIMEOUT = 120.0
#: after the agent's HELLO: the agent brings the other vCPUs online; let it finish
SETTLE_SECONDS = 1.0
#: after the agent's HELLO the saved boot drops its caches; the kernel reports freed
#: pages to the host 2 s after they were freed (mm/page_reporting.c): wait for that,
#: so that the state holds none of them
REPORT_SECONDS = 3.0
#: the qube's own part of the boot after a restore takes ~0.2 s: past this, something
#: is wrong with the state, and the start boots cold instead
RESUME_TIMEOUT = 10.0
#: states kept per template root, one per machine shape (plain, with a netvm link, a
#: netvm's, a GUI qube's, other memory sizes...); beyond it the least recently used go
KEEP_PER_ROOT = 8
#: a state's directory records its last use (its mtime) at most this often
TOUCH_SECONDS = 60.0
#: the feature that turns restored starts off for one qube (``qvm-features Q boot-state 0``)
FEATURE = "boot-state"
FALSE_WORDS = ("0", "", "false", "no", "off")


class BootStateError(QubesException):
    pass


class RestoreFailed(BootStateError):
    """A state did not load, or the restored guest did not take RESUME: the state is
    discarded, and the start boots cold."""

    def __init__(self, state: "SavedState", message: str) -> None:
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class SavedState:
    key: str
    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def root(self) -> Path:
        return self.dir / ROOT_FILE


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _their_words(text: str) -> str:
    """The end of what a restored guest said, for an error: printable characters only."""
    return "".join(c if c.isprintable() else " " for c in text).strip()[-300:]


def builder_spec(spec: MachineSpec, key: str, root: Path, private: Path,
                 volatile: Path, nic_fds: list[int], data: Path | None = None) -> MachineSpec:
    """The machine whose boot is saved: the qube's shape under a neutral name and qid,
    on the state's frozen root and two placeholder disks (and a data disk if the
    shape has one: :mod:`bulkhead.datadisk`), its network devices on links that
    lead nowhere."""
    disks = (DiskSpec("root", root), DiskSpec("private", private), DiskSpec("volatile", volatile))
    if data is not None and datadisk.has_data_disk(spec):
        disks += (datadisk.disk_spec(data),)
    more = {"nics": neutral_nics(spec, nic_fds)} if hasattr(spec, "nics") else {}
    return dataclasses.replace(spec, name=f"boot-state-{key[:12]}", qid=BUILDER_QID,
                               disks=disks, extra=saved_extra(spec), **more)


#: what of a qube's ``extra`` its saved boot shares (the rest is per qube, given after)
SHARED_EXTRA = ("gui",)


def neutral_mac(i: int) -> str:
    """The MAC of network device ``i`` in a saved boot (locally administered): each
    restored qube's agent changes it to the qube's own before its network is set up."""
    return f"02:b4:00:00:00:{i + 1:02x}"


def neutral_nics(spec: MachineSpec, fds: list[int] | None = None) -> tuple[Any, ...]:
    """The qube's network devices as its saved boot has them: the same kinds in the same
    order, neutral MACs, and (for the fingerprint) fixed descriptor numbers."""
    nics = getattr(spec, "nics", ())
    return tuple(dataclasses.replace(n, mac=neutral_mac(i),
                                     fd=fds[i] if fds is not None else 100 + i)
                 for i, n in enumerate(nics))


def restorable_nics(spec: MachineSpec) -> bool:
    """Only links through dom0's relay can be given after a restore: a tap or passt
    uplink is its own device, a netvm with one boots cold."""
    return all(getattr(n, "kind", "link") == "link" for n in getattr(spec, "nics", ()))


def saved_extra(spec: MachineSpec) -> dict[str, str]:
    """The saved boot's ``extra``: a GUI qube's saved boot runs its GUI agent too."""
    extra = {k: spec.extra[k] for k in SHARED_EXTRA if k in spec.extra}
    extra["boot_state"] = "save"
    return extra


def restore_spec(spec: MachineSpec) -> MachineSpec:
    extra = {k: v for k, v in spec.extra.items() if k != "resize_private"}
    extra["boot_state"] = "restore"
    return dataclasses.replace(spec, extra=extra)


def device_fingerprint(spec: MachineSpec, accel: Any) -> str:
    """QEMU's command line for this shape of machine, with every per-qube path and
    name made neutral: two machines whose fingerprints match can load each other's
    state (same memory, vCPUs, devices, kernel and kernel command line)."""
    more = {"nics": neutral_nics(spec)} if hasattr(spec, "nics") else {}
    neutral = dataclasses.replace(
        spec, name="qube", qid=1, kernel=Path("/kernel") if spec.kernel else None, **more,
        disks=tuple(DiskSpec(d.name, Path(f"/{d.name}"), d.fmt, d.readonly) for d in spec.disks),
        extra=saved_extra(spec))
    from .backend.qemu import SOCKETS
    argv = build_argv(neutral, accel, Path("/run/qube"),
                      {name: 3 + i for i, name in enumerate(SOCKETS)})
    return "\0".join(argv)


class BootStates:
    """The saved boot states of one daemon: find, check, build, restore."""

    def __init__(self, lifecycle: Any, directory: Path, shared: Path) -> None:
        self.lifecycle = lifecycle
        self.dir = directory          # this instance's states
        self.shared = shared          # states on images of the build cache, for every instance
        self._kernel_ids: dict[tuple[str, int, int], str] = {}
        self._verified: dict[str, tuple[int, int, int, int]] = {}   # key -> the file's stat
        self._builds: dict[str, asyncio.Task[SavedState | None]] = {}
        self.build_delay = float(os.environ.get("BULKHEAD_BOOT_STATE_DELAY", "3"))

    # --- eligibility and keys -------------------------------------------------------
    def wanted(self, vm: Any) -> bool:
        """Whether ``vm`` starts from a saved state (if one is ready)."""
        # As Qubes reads such features: the qube's own, else its template's (a
        # disposable takes its disposable template's).
        if str(vm.features.check_with_template(FEATURE, "1")).lower() in FALSE_WORDS:
            return False
        if os.environ.get("BULKHEAD_BOOT_STATES", "1") in FALSE_WORDS:
            return False
        if str(getattr(vm, "virt_mode", "")) not in ("pvh", "pv") or not getattr(vm, "kernel", None):
            return False
        config = vm.volume_config.get("root")
        if config is None or not config.snap_on_start or not config.source:
            return False
        return set(vm.volume_config) - {"kernel"} == {"root", "private", "volatile"}

    def key_for(self, spec: MachineSpec, root_image: Path) -> str:
        """Digest of every input of a state for this machine on this template root image."""
        backend = self.lifecycle.backend
        accel = getattr(backend, "accel", None)
        qemu = shutil.which(QEMU) or QEMU
        parts = [FORMAT, device_fingerprint(spec, accel), str(root_image.absolute()),
                 _stamp(root_image), _stamp(Path(qemu)),
                 self._kernel_id(spec.kernel) if spec.kernel else "", getattr(accel, "name", "")]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def _kernel_id(self, kernel: Path) -> str:
        """The kernel's content (each instance has its own copy of the same build)."""
        st = kernel.stat()
        memo = (str(kernel), st.st_size, st.st_mtime_ns)
        if memo not in self._kernel_ids:
            self._kernel_ids[memo] = _sha256(kernel)
        return self._kernel_ids[memo]

    def home_of(self, root_image: Path) -> Path:
        """Where the states built on ``root_image`` live (see the module's doc)."""
        try:
            root_image.absolute().relative_to(self.shared.parent)
            return self.shared
        except ValueError:
            return self.dir

    # --- finding a usable state ---------------------------------------------------
    def find(self, key: str, home: Path) -> SavedState | None:
        """The state for ``key`` if it is complete and undamaged; a damaged one is removed."""
        st = SavedState(key, home / key)
        try:
            meta = json.loads((st.dir / META_FILE).read_text())
            s = st.state.stat()
            st.root.stat()
        except (OSError, ValueError):
            return None
        stamp = (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
        if self._verified.get(key) != stamp:
            if meta.get("format") != FORMAT or meta.get("size") != s.st_size \
                    or meta.get("sha256") != _sha256(st.state):
                log.warning("saved boot state %s is damaged or from another version; "
                            "discarding it (it is rebuilt)", key)
                self.discard(st)
                return None
            self._verified[key] = stamp
        try:
            if time.time() - st.dir.stat().st_mtime > TOUCH_SECONDS:
                os.utime(st.dir)      # used now: the last to go when states are pruned
        except OSError:
            pass
        return st

    def discard(self, st: SavedState) -> None:
        self._verified.pop(st.key, None)
        shutil.rmtree(st.dir, ignore_errors=True)

    def prune(self, home: Path, root_source: str, keep: str, current_image: Path) -> None:
        """Drop the states whose root image is gone; in this instance's own directory,
        also those of ``root_source`` on another image than its current one (the
        template changed since); and the least recently used beyond KEEP_PER_ROOT."""
        try:
            entries = list(home.iterdir())
        except FileNotFoundError:
            return
        mine = []
        for d in entries:
            if d.name.startswith(".") or d.name == keep:
                continue
            try:
                meta = json.loads((d / META_FILE).read_text())
            except (OSError, ValueError):
                continue
            # A running qube may still read a discarded state's frozen root: it has it open.
            if not Path(meta.get("root_image", "")).exists():
                self.discard(SavedState(d.name, d))
            elif home == self.shared:
                if meta.get("root_image") == str(current_image.absolute()):
                    mine.append((d.stat().st_mtime, d.name))
            elif meta.get("root_source") == root_source:
                if meta.get("root_image") != str(current_image.absolute()):
                    self.discard(SavedState(d.name, d))
                else:
                    mine.append((d.stat().st_mtime, d.name))
        mine.sort()
        for _, name in mine[:max(0, len(mine) - (KEEP_PER_ROOT - 1))]:
            self.discard(SavedState(name, home / name))

    # --- building ----------------------------------------------------------------
    def building(self, key: str) -> "asyncio.Task[SavedState | None] | None":
        task = self._builds.get(key)
        return task if task is not None and not task.done() else None

    def build_later(self, key: str, spec: MachineSpec, root_source: str, root_image: Path) -> None:
        """Build the state for ``key`` in the background (once), after a short delay so
        that it does not compete with the start that found it missing."""
        if self.building(key):
            return
        self._builds[key] = asyncio.ensure_future(
            self._build_quietly(key, spec, root_source, root_image, self.build_delay))

    async def build_now(self, key: str, spec: MachineSpec, root_source: str,
                        root_image: Path) -> SavedState | None:
        task = self._builds.get(key)
        if task is None or task.done():
            task = self._builds[key] = asyncio.ensure_future(
                self._build_quietly(key, spec, root_source, root_image, 0.0))
        return await asyncio.shield(task)

    async def _build_quietly(self, key: str, spec: MachineSpec, root_source: str,
                             root_image: Path, delay: float) -> SavedState | None:
        if delay:
            await asyncio.sleep(delay)
        found = self.find(key, self.home_of(root_image))
        if found is not None:
            return found
        try:
            return await self._build(key, spec, root_source, root_image)
        except Exception as e:  # noqa: BLE001 -- a missing state only means cold starts
            log.warning("cannot build a saved boot state for %s: %s; qubes of it boot cold",
                        root_source, e)
            return None

    async def _build(self, key: str, spec: MachineSpec, root_source: str,
                     root_image: Path) -> SavedState:
        t0 = time.monotonic()
        home = self.home_of(root_image)
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        tmp = home / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir()
        backend: Backend = self.lifecycle.backend
        machine: Machine | None = None
        link: AgentLink | None = None
        try:
            root, private, volatile = tmp / ROOT_FILE, tmp / "private.qcow2", tmp / "volatile.qcow2"
            await qemu_img.create(root, None, backing=root_image.absolute())
            await qemu_img.create(private, PLACEHOLDER_BYTES)
            await qemu_img.create(volatile, PLACEHOLDER_BYTES)
            # Links that lead nowhere (nobody reads their packet sockets), of the
            # qube's kind: a tap's virtio-net offloads are part of the saved state.
            from .network.link import open_links
            count = len(getattr(spec, "nics", ()))
            nowhere = await open_links(count) if count else []
            try:
                data = tmp / datadisk.FILE_NAME
                if datadisk.has_data_disk(spec):
                    datadisk.make_file(data)
                bspec = builder_spec(spec, key, root, private, volatile,
                                     [tap for tap, _pkt in nowhere], data)
                machine = await backend.start(bspec, lambda _n, _r: None)
            finally:
                for tap, pkt in nowhere:
                    os.close(tap)
                    pkt.close()
            from .agentlink import AgentLink
            link = AgentLink(bspec.name, str(machine.agent_socket))
            await link.ensure_ready(BUILD_TIMEOUT)
            await asyncio.sleep(max(REPORT_SECONDS, SETTLE_SECONDS if spec.vcpus > 1 else 0))
            size = await machine.save_state(tmp / STATE_FILE)
            await machine.kill()
            machine = None
            link.close("the boot state is saved")
            # The frozen root is read (never written) by every restored qube's overlay:
            # dom0's, no longer the builder's jail uid's.
            jail.take_back(root, 0o644)
            for p in (private, volatile):
                p.unlink()
            data.unlink(missing_ok=True)
            meta = {"format": FORMAT, "key": key, "size": size,
                    "sha256": await asyncio.get_running_loop().run_in_executor(
                        None, _sha256, tmp / STATE_FILE),
                    "root_source": root_source, "root_image": str(root_image.absolute()),
                    "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
                    "built": time.time(), "build_seconds": round(time.monotonic() - t0, 2)}
            (tmp / META_FILE).write_text(json.dumps(meta))
            qemu_img.fsync_file(tmp / META_FILE)
            final = home / key
            if self.find(key, home) is not None:
                # Another daemon (sharing the cache) finished the same state first; in use maybe.
                return SavedState(key, final)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            qemu_img.fsync_dir(home)
            log.info("saved boot state %s for %s: %.1f MiB in %.1f s", key, root_source,
                     size / 2**20, time.monotonic() - t0)
            self.prune(home, root_source, keep=key, current_image=root_image)
            return SavedState(key, final)
        finally:
            if link is not None:
                link.close("the boot state build ended")
            if machine is not None:
                try:
                    await machine.kill()
                except BackendError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)

    def clean_up(self) -> None:
        """At the daemon's start: half-built states of a previous run of this daemon go
        (in the shared directory only this process' own, which other daemons leave be)."""
        try:
            for d in self.dir.iterdir():
                if d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)
        except FileNotFoundError:
            pass
        try:
            for d in self.shared.iterdir():
                pid = d.name.rpartition(".tmp-")[2].split("-")[0]
                if d.name.startswith(".") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    shutil.rmtree(d, ignore_errors=True)
        except FileNotFoundError:
            pass

    # --- restoring ---------------------------------------------------------------------
    @staticmethod
    async def disk_sizes(machine: Any) -> dict[str, int]:
        """The virtual size of each of the machine's disks, from QEMU."""
        blocks = await machine._qmp("query-block")
        out = {}
        for b in blocks if isinstance(blocks, list) else []:
            image = (b.get("inserted") or {}).get("image") or {}
            if "virtual-size" in image:
                out[str(b.get("device"))] = int(image["virtual-size"])
        return out

    async def restore(self, vm: Any, machine: Any, link: "AgentLink", st: SavedState,
                      spec: MachineSpec, resize_private: bool, timeout: float) -> None:
        """Load ``st`` into the just-launched ``machine`` and make it qube ``vm``."""
        t0 = time.monotonic()
        connect = asyncio.ensure_future(link.connect_restored(timeout))
        try:
            await machine.restore_state(st.state)
        except BackendError as e:
            connect.cancel()
            raise RestoreFailed(st, f"its saved boot state {st.key} did not load: {e}") from e
        except BaseException:
            connect.cancel()
            raise
        await connect
        sizes = await self.disk_sizes(machine)
        sectors = {}
        for dev, disk in (("private", "vdb"), ("volatile", "vdc")):
            if dev in sizes:
                # The same size: QEMU still tells the guest its disk "changed size",
                # and the guest reads the capacity (it had the placeholder's).
                await machine.block_resize(dev, sizes[dev])
                sectors[disk] = sizes[dev] // 512
        await machine.unpause()
        t1 = time.monotonic()
        macs = {neutral_mac(i): n.mac for i, n in enumerate(getattr(spec, "nics", ()))}
        payload = P.pack_resume(secrets.token_bytes(P.SEED_BYTES), vm.name, resize_private,
                                sectors, macs)
        call = await link.resume(payload)
        output = b""
        deadline = time.monotonic() + min(timeout, RESUME_TIMEOUT)
        while True:
            try:
                kind, value = await asyncio.wait_for(call.next_event(),
                                                     max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                said = _their_words(output.decode(errors="replace"))
                raise RestoreFailed(st, f"qube {vm.name!r}: its own part of the boot did not "
                                        f"end within {min(timeout, RESUME_TIMEOUT):.0f} s "
                                        f"after the restore from {st.key}"
                                        + (f" (it said: {said})" if said else "")) from None
            if kind in ("stdout", "stderr") and isinstance(value, bytes):
                output = (output + value)[-2000:]
            elif kind in ("exit", "error"):
                if kind == "exit" and value == 0:
                    log.info("qube %s: restored from %s in %.0f ms, its own boot %.0f ms",
                             vm.name, st.key, (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)
                    return
                said = _their_words(output.decode(errors="replace") + str(value))
                raise RestoreFailed(st, f"qube {vm.name!r}: its own part of the boot failed "
                                        f"after the restore from {st.key}: {said}")

