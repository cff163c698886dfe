"""dom0's side of networking: links at a qube's start, its netvm's configuration, moves.

For each qube that starts (``QemuLifecycle`` calls in here, in clearly
separated blocks):

1. :meth:`Network.prepare`, before QEMU is launched: the network devices it
   gets.  A qube with a netvm gets one virtio-net on a link (:mod:`.link`: a
   tap in a namespace of its own) whose other end, a packet socket, dom0 keeps,
   to hand to its netvm's relay.  A qube
   that provides network gets a *trunk* towards its own VLAN relay
   (:mod:`.relay`, started now, jailed), and if it has no netvm, its uplink
   (:mod:`.uplink`).  A qube with neither gets no network device at all.
2. :meth:`Network.started`, once its agent said HELLO: its own configuration
   is pushed (over the agent channel, the built-in call ``bulkhead.NetConfig``,
   see :mod:`bulkhead.guest.netconf`), its link is given to its netvm's
   relay on VLAN = its qid, and the netvm gets its new client list (a vif,
   routes, anti-spoofing and the client's firewall rules).
3. :meth:`Network.stopped`, when its machine went: the reverse.

dom0 holds each client's relay-side socket, so moving a running qube to
another netvm (``property-set:netvm``) is: the old relay drops the VLAN, the
new relay gets the same socket, both netvms and the qube get their new
state.  No packet passes through dom0's network stack: the links are taps in
namespaces of their own (no address, no route, no bridge), dom0's namespace has
only ``lo``.

Every push sends the qube's *whole* network state, so pushes are idempotent;
pushes to one qube never overlap, and a push asked for while one runs is done
once more afterwards with the newest state.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from .. import firewall
from ..backend import jail
from ..backend.base import NicSpec
from ..errors import QubesException, QubesVMError
from ..guest.fwrules import RuleError
from . import addressing, link as links, uplink as uplinks

log = logging.getLogger("bulkhead.network")

NETCONF_SERVICE = "bulkhead.NetConfig"
PUSH_TIMEOUT = 60.0
#: the relay's uid within this instance's block of jail uids (qubes have 1..254)
RELAY_ID = 255


def uplink_mac(qid: int) -> str:
    return f"00:16:3e:5f:6c:{qid:02x}"


# --- what a qube is told (pure) --------------------------------------------------------------
def config_text(*, link: tuple[str, str, str] | None = None, nolink: bool = False,
                trunk: tuple[str, str] | None = None,
                uplink: tuple[str, str, str] | None = None, dns: tuple[str, ...] = (),
                clients: list[tuple[int, str, str, list[dict[str, str]] | None]] = (),
                tor: str | None = None) -> str:
    """The lines :mod:`bulkhead.guest.netconf` reads.  ``clients``: (vid, ip, mac, rules);
    rules None: the client's rules are unusable, it is blocked."""
    from ..guest import fwrules

    lines = []
    if link:
        lines.append("link %s %s %s" % link)
    elif nolink:
        lines.append("nolink")
    if trunk:
        lines.append("trunk %s %s" % trunk)
    if uplink:
        lines.append("uplink %s %s %s" % uplink)
    if dns:
        lines.append("dns " + " ".join(dns))
    if tor:
        lines.append(f"tor {tor}")
    for vid, ip, mac, rules in clients:
        lines.append(f"client {vid} {ip} {mac}")
        if rules is None:
            lines.append(f"norules {vid}")
            continue
        lines += [f"rule {vid} {fwrules.format_rule(r)}" for r in rules]
    return "".join(line + "\n" for line in lines)


def _printable(text: str, limit: int = 600) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()[-limit:]


# --- the relay process of one netvm ---------------------------------------------------------
class RelayProcess:
    """dom0's handle on one netvm's relay: its control connection (and its process, if
    this daemon started it; a relay adopted from an earlier daemon has none here)."""

    def __init__(self, netvm: str, proc: asyncio.subprocess.Process | None,
                 control: socket.socket) -> None:
        self.netvm = netvm
        self.proc = proc
        self.control = control
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls, netvm: str, trunk: socket.socket, uid: int | None,
                    log_path: Any, listen_path: Any) -> "RelayProcess":
        listen_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        listen_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            listener.bind(str(listen_path))
        finally:
            os.umask(old)
        listener.listen(2)
        fds = [listener.fileno(), trunk.fileno()]
        argv = [sys.executable, "-m", "bulkhead.network.relay", *map(str, fds)]
        if uid is not None:
            argv = relay_jail(uid) + argv
        env = {"PATH": "/usr/bin:/bin"}
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as err:
            # Its own session: the relay outlives a daemon that stops or dies, so the
            # links keep working and the next daemon takes it over (:meth:`connect`).
            proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        listener.close()
        trunk.close()
        try:
            relay = await cls.connect(netvm, listen_path)
        except QubesException:
            proc.kill()
            await proc.wait()
            raise QubesException(f"the network relay of {netvm!r} did not start; "
                                 f"see {log_path}") from None
        relay.proc = proc
        return relay

    @classmethod
    async def connect(cls, netvm: str, listen_path: Any) -> "RelayProcess":
        """Take over the control of a running relay (a new daemon adopting it)."""
        loop = asyncio.get_running_loop()
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.setblocking(False)
        deadline = loop.time() + 20
        while True:
            try:
                await loop.sock_connect(control, str(listen_path))
                said = await asyncio.wait_for(loop.sock_recv(control, 64),
                                              max(0.1, deadline - loop.time()))
                break
            except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError) as e:
                if loop.time() > deadline or isinstance(e, asyncio.TimeoutError):
                    control.close()
                    raise QubesException(f"no network relay of {netvm!r} answers") from None
                await asyncio.sleep(0.05)
        if said != b"ready":
            control.close()
            raise QubesException(f"the network relay of {netvm!r} said {said[:40]!r}")
        return cls(netvm, None, control)

    async def _ask(self, msg: bytes, fd: int | None = None) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        async with self.lock:
            anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [fd]))]
            self.control.sendmsg([msg], anc)
            ready = loop.create_future()
            loop.add_reader(self.control.fileno(), lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, 10)
            finally:
                loop.remove_reader(self.control.fileno())
            reply, anc_in, _f, _a = self.control.recvmsg(256, socket.CMSG_SPACE(4))
        fds = [f for level, kind, data in anc_in
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for f in array.array("i", data[:len(data) - len(data) % 4])]
        if not reply.startswith(b"ok"):
            for f in fds:
                os.close(f)
            raise QubesException(f"the network relay of {self.netvm!r} refused "
                                 f"{msg.decode()!r}: {reply.decode(errors='replace')!r}")
        return reply, fds

    async def add(self, vid: int, sock: socket.socket) -> None:
        await self._ask(f"add {vid}".encode(), sock.fileno())

    async def remove(self, vid: int) -> None:
        await self._ask(f"del {vid}".encode())

    async def take(self, vid: int) -> socket.socket | None:
        """A copy of client ``vid``'s link, held by the relay (None if it has none)."""
        try:
            _reply, fds = await self._ask(f"take {vid}".encode())
        except QubesException:
            return None
        return socket.socket(fileno=fds[0]) if fds else None

    async def watch(self, pid: int) -> None:
        """The relay exits by itself when the netvm's QEMU (``pid``) does."""
        pidfd = os.pidfd_open(pid)
        try:
            await self._ask(b"watch", pidfd)
        finally:
            os.close(pidfd)

    async def stop(self) -> None:
        try:
            self.control.send(b"quit")
        except OSError:
            pass
        self.control.close()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def relay_jail(uid: int) -> list[str]:
    """bubblewrap + setpriv for a relay: its own uid, no capabilities, an empty network
    namespace of its own (it only uses the descriptors it is given), read-only Python."""
    argv = [jail.BWRAP, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
            "--unshare-cgroup-try", "--new-session",
            "--ro-bind", "/usr", "/usr"]
    for link, target in jail.USR_LINKS.items():
        argv += ["--symlink", target, link]
    binds = {sys.prefix, sys.base_prefix, "/etc/ld.so.cache"}
    binds |= {p for p in sys.path if p and os.path.exists(p)}
    binds = {p for p in binds if not p.startswith("/usr/") and os.path.exists(p)}
    # bwrap makes a mount's missing parents mode 0700: make them walkable first.
    parents = {a for p in binds for a in jail._ancestors(os.path.dirname(p))}
    for d in sorted(parents):
        argv += ["--perms", "0755", "--dir", d]
    for path in sorted(binds):
        argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--proc", "/proc", "--remount-ro", "/", "--",
             jail.SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
             "--no-new-privs", "--"]
    return argv


# --- the manager --------------------------------------------------------------------------------
class Network:
    """Links, relays and configuration pushes for one daemon's qubes."""

    def __init__(self, app: Any, paths: Any) -> None:
        self.app = app
        self.paths = paths
        self.relays: dict[str, RelayProcess] = {}
        #: client name -> dom0's end of its link (what its netvm's relay is given)
        self.links: dict[str, socket.socket] = {}
        #: client name -> the netvm whose relay has its link now
        self.attached: dict[str, str] = {}
        #: descriptors for QEMU, closed once it is launched
        self._for_qemu: dict[str, list[int]] = {}
        self._extra_procs: dict[str, Any] = {}
        self._pushing: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        #: the last problem a netvm reported for each client (tests and `why`)
        self.last_error: dict[str, str] = {}
        self._jail_uid: int | None | bool = False
        self._adopted: set[str] = set()
        app.add_observer(self._observe)

    # --- a qube's start ------------------------------------------------------------
    def _relay_uid(self) -> int | None:
        if self._jail_uid is False:
            if not jail.enabled():
                self._jail_uid = None
            else:
                ids = jail.read_range()
                self._jail_uid = ids.ids_for(jail.instance_slot(self.paths.home, ids.count),
                                             RELAY_ID)
        return self._jail_uid  # type: ignore[return-value]

    def nic_shape(self, vm: Any) -> tuple[NicSpec, ...] | None:
        """The network devices :meth:`prepare` will give ``vm`` -- names and kinds only,
        nothing made -- for a saved boot state of its shape (bulkhead.bootstate); None
        when one cannot be given after a restore (a tap or passt uplink)."""
        nics = []
        if vm.netvm is not None:
            nics.append(NicSpec("net0", "", -1, "link"))
        if vm.provides_network:
            nics.append(NicSpec("trunk", "", -1, "link"))
            if vm.netvm is None:
                try:
                    mode = uplinks.parse(self._features(vm)).mode
                except uplinks.UplinkError:
                    return None
                if mode != "none":
                    return None
        return tuple(nics)

    async def prepare(self, vm: Any) -> tuple[NicSpec, ...]:
        """The network devices of ``vm``'s machine (before QEMU is launched)."""
        name = vm.name
        self.stopped_sync(name)   # leftovers of an earlier run
        nics: list[NicSpec] = []
        qemu_fds: list[int] = []
        self._for_qemu[name] = qemu_fds
        try:
            count = (vm.netvm is not None) + bool(vm.provides_network)
            try:
                made = await links.open_links(count) if count else []
            except links.LinkError as e:
                raise QubesVMError(vm, f"qube {name!r}: its network links: {e}") from None
            if vm.netvm is not None:
                tap, ours = made.pop(0)
                self.links[name] = ours
                qemu_fds.append(tap)
                nics.append(NicSpec("net0", str(vm.mac), tap, "link"))
            if vm.provides_network:
                tap, relay_end = made.pop(0)
                qemu_fds.append(tap)
                nics.append(NicSpec("trunk", addressing.GATEWAY_MAC, tap, "link"))
                self.relays[name] = await RelayProcess.start(
                    name, relay_end, self._relay_uid(),
                    self.paths.log_dir / "network" / f"relay-{name}.log",
                    self._relay_path(name))
                if vm.netvm is None:
                    nic = await self._uplink(vm)
                    if nic is not None:
                        qemu_fds.append(nic.fd)
                        nics.append(nic)
        except BaseException:
            self.launched(vm)
            self.stopped_sync(name)
            raise
        return tuple(nics)

    def _relay_path(self, netvm: str) -> Any:
        return self.paths.qube_run_dir(netvm) / "relay.sock"

    def _features(self, vm: Any) -> dict[str, str]:
        return {k: str(vm.features[k]) for k in ("uplink", "uplink-address", "uplink-gateway",
                                                 "uplink-dns") if k in vm.features}

    async def _uplink(self, vm: Any) -> NicSpec | None:
        try:
            up = uplinks.parse(self._features(vm))
        except uplinks.UplinkError as e:
            raise QubesVMError(vm, f"qube {vm.name!r}: {e}") from None
        mac = uplink_mac(int(vm.qid))
        if up.mode == "none":
            return None
        if up.mode == "bridge":
            try:
                fd = await uplinks.open_bridge_tap(
                    up, uplinks.tap_name(self.paths.run.name, int(vm.qid)))
            except uplinks.UplinkError as e:
                raise QubesVMError(vm, f"qube {vm.name!r}: uplink {up.netns}:{up.bridge}: {e}") \
                    from None
            return NicSpec("uplink", mac, fd, "tap")
        fd, proc = await uplinks.start_passt(vm.name)
        self._extra_procs[vm.name] = proc
        return NicSpec("uplink", mac, fd, "stream")

    def launched(self, vm: Any) -> None:
        """QEMU holds its descriptors now (or failed to start): close dom0's copies."""
        for fd in self._for_qemu.pop(vm.name, []):
            try:
                os.close(fd)
            except OSError:
                pass

    async def started(self, vm: Any) -> None:
        """The qube's agent answers: configure it, join it to its netvm, serve its clients."""
        try:
            relay = self.relays.get(vm.name)
            machine = self.app.lifecycle.machines.get(vm.name)
            if relay is not None and machine is not None and machine.pid:
                await relay.watch(machine.pid)
            if vm.provides_network:
                await self.push(vm)
                for client in list(self.app.domains):
                    if getattr(client, "netvm", None) is vm and client.name in self.links \
                            and client.name not in self.attached:
                        await self._attach(client, vm)
            if vm.netvm is not None and vm.name in self.links:
                await self._attach(vm, vm.netvm)
        except QubesException as e:
            log.error("qube %s: its network could not be set up: %s", vm.name, e)

    async def _attach(self, vm: Any, netvm: Any) -> None:
        relay = self.relays.get(netvm.name)
        if relay is None:
            log.warning("qube %s: netvm %s has no running relay; no network", vm.name, netvm.name)
            return
        await relay.add(addressing.vlan_id(int(vm.qid)), self.links[vm.name])
        self.attached[vm.name] = netvm.name
        await self.push(netvm)
        await self.push(vm)

    async def _detach(self, name: str, qid: int) -> str | None:
        netvm_name = self.attached.pop(name, None)
        relay = self.relays.get(netvm_name or "")
        if relay is not None:
            try:
                await relay.remove(addressing.vlan_id(qid))
            except (QubesException, OSError, asyncio.TimeoutError) as e:
                log.warning("qube %s: the relay of %s: %s", name, netvm_name, e)
        return netvm_name

    # --- a new daemon, qubes already running -------------------------------------------
    async def adopt(self, vm: Any) -> None:
        """A running qube left by an earlier daemon: take its relay (if it is a netvm)
        and its link (from its netvm's relay) back, so that moves, firewall changes
        and stops work as if this daemon had started it."""
        try:
            if vm.provides_network and self._relay_path(vm.name).exists():
                self.relays[vm.name] = await RelayProcess.connect(
                    vm.name, self._relay_path(vm.name))
                for client in list(self.app.domains):
                    if getattr(client, "netvm", None) is vm and client.name in self._adopted:
                        await self._take_link(client, vm)
            self._adopted.add(vm.name)
            netvm = getattr(vm, "netvm", None)
            if netvm is not None and netvm.name in self.relays:
                await self._take_link(vm, netvm)
        except (QubesException, OSError) as e:
            log.warning("qube %s: its network links could not be adopted: %s", vm.name, e)

    async def _take_link(self, client: Any, netvm: Any) -> None:
        sock = await self.relays[netvm.name].take(addressing.vlan_id(int(client.qid)))
        if sock is not None:
            self.links[client.name] = sock
            self.attached[client.name] = netvm.name
            log.info("qube %s: adopted its link on %s", client.name, netvm.name)

    # --- a qube's stop ----------------------------------------------------------------
    def stopped_sync(self, name: str) -> None:
        sock = self.links.pop(name, None)
        if sock is not None:
            sock.close()
        relay = self.relays.pop(name, None)
        if relay is not None:
            asyncio.ensure_future(relay.stop())
        proc = self._extra_procs.pop(name, None)
        if proc is not None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        timer = self._expiry.pop(name, None)
        if timer is not None:
            timer.cancel()
        for client, netvm in list(self.attached.items()):
            if netvm == name:
                del self.attached[client]

    async def stopped(self, vm: Any) -> None:
        """The qube's machine went: its link goes from its netvm, its relay stops."""
        netvm_name = await self._detach(vm.name, int(vm.qid))
        self.stopped_sync(vm.name)
        netvm = self.app.domains.get(netvm_name) if netvm_name else None
        if netvm is not None and netvm.is_running():
            self.schedule_push(netvm)

    # --- moving a running qube ------------------------------------------------------------
    async def move(self, vm: Any) -> None:
        """``vm``'s netvm changed while it runs: follow it without a restart."""
        new = vm.netvm
        old_name = await self._detach(vm.name, int(vm.qid))
        old = self.app.domains.get(old_name) if old_name else None
        if old is not None and old.is_running():
            self.schedule_push(old)
        if new is not None and vm.name in self.links:
            await self._attach(vm, new)
        else:
            await self.push(vm)

    # --- pushing a qube's state -----------------------------------------------------------
    def client_rules(self, client: Any) -> list[dict[str, str]] | None:
        """The rules in force for a client now, None if they cannot be used (blocked)."""
        try:
            rules = firewall.load(self.paths.home, client.name)
        except RuleError as e:
            log.error("qube %s: firewall rules unusable, the qube is blocked: %s",
                      client.name, e)
            return None
        now = time.time()
        self._schedule_expiry(client, firewall.next_expiry(rules, now))
        return firewall.active(rules, now)

    def _schedule_expiry(self, client: Any, when: int | None) -> None:
        old = self._expiry.pop(client.name, None)
        if old is not None:
            old.cancel()
        if when is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time()) + 0.05
        self._expiry[client.name] = loop.call_later(delay, self.firewall_changed, client)

    def config_of(self, vm: Any) -> str:
        link = None
        if vm.netvm is not None and self.attached.get(vm.name) == vm.netvm.name:
            link = (str(vm.mac), str(vm.visible_ip), str(vm.netvm.gateway))
        trunk = uplink = None
        dns: tuple[str, ...] = ()
        clients = []
        if vm.provides_network and vm.name in self.relays:
            trunk = (addressing.GATEWAY_MAC, str(vm.visible_ip))
            if vm.netvm is None:
                try:
                    up = uplinks.parse(self._features(vm))
                except uplinks.UplinkError:
                    up = uplinks.Uplink("none")
                if up.mode == "bridge":
                    uplink = (uplink_mac(int(vm.qid)), up.address, up.gateway)
                    dns = up.dns
            for name, netvm in sorted(self.attached.items()):
                client = self.app.domains.get(name)
                if netvm == vm.name and client is not None:
                    clients.append((addressing.vlan_id(int(client.qid)), str(client.visible_ip),
                                    str(client.mac), self.client_rules(client)))
        tor = None
        if trunk and vm.features.get("tor-gateway", ""):
            bridge = str(vm.features.get("tor-bridge", ""))
            tor = f"bridge {bridge}" if bridge else "online"
        return config_text(link=link, nolink=link is None and vm.netvm is None, trunk=trunk,
                           uplink=uplink, dns=dns, clients=clients, tor=tor)

    def schedule_push(self, vm: Any) -> None:
        asyncio.ensure_future(self.push(vm))

    async def push(self, vm: Any) -> bool:
        """Send ``vm`` its whole network state; True once applied without a problem."""
        name = vm.name
        running = self._pushing.get(name)
        if running is not None:
            self._again.add(name)
            await asyncio.shield(running)
            if name in self._again:
                self._again.discard(name)
                return await self.push(vm)
            return name not in self.last_error
        task = asyncio.ensure_future(self._push(vm))
        self._pushing[name] = task
        try:
            await asyncio.shield(task)
        finally:
            if self._pushing.get(name) is task:
                del self._pushing[name]
        return name not in self.last_error

    async def _push(self, vm: Any) -> None:
        text = self.config_of(vm)
        try:
            # Not lifecycle.agent(): a starting qube (Transient) is configured too.
            link = self.app.lifecycle.link(vm)
            await link.ensure_ready(30.0)
            call = await link.service("root", NETCONF_SERVICE, "dom0")
            await call.write(text.encode())
            await call.close_stdin()
            said = b""
            code = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + PUSH_TIMEOUT
            while code is None:
                kind, value = await asyncio.wait_for(call.next_event(),
                                                     max(0.1, deadline - loop.time()))
                if kind in ("stdout", "stderr", "error") and value:
                    # The qube's words: kept short and printable, only to be logged.
                    data = value if isinstance(value, bytes) else str(value).encode()
                    said = (said + data)[-4000:]
                elif kind == "exit":
                    code = int(value)  # type: ignore[arg-type]
        except (QubesException, OSError, asyncio.TimeoutError) as e:
            self.last_error[vm.name] = f"cannot configure its network: {e}"
            log.error("qube %s: cannot push its network configuration: %s", vm.name, e)
            return
        if code != 0:
            why = _printable(said.decode("utf-8", "replace")) or f"exit status {code}"
            self.last_error[vm.name] = why
            log.error("qube %s: network configuration not fully applied (exit %s): %s",
                      vm.name, code, why)
        else:
            self.last_error.pop(vm.name, None)

    # --- firewall --------------------------------------------------------------------------
    def firewall_changed(self, vm: Any) -> asyncio.Future[bool] | None:
        """The rules of ``vm`` changed (or one expired): its netvm gets them at once."""
        netvm_name = self.attached.get(vm.name)
        netvm = self.app.domains.get(netvm_name) if netvm_name else None
        if netvm is None or not netvm.is_running():
            return None
        return asyncio.ensure_future(self.push(netvm))

    # --- events ------------------------------------------------------------------------------
    def _observe(self, subject: Any, event: str, kwargs: dict[str, Any]) -> None:
        if event in ("property-set:netvm", "property-reset:netvm"):
            if subject.name in self.links or subject.name in self.attached:
                asyncio.ensure_future(self._move_logged(subject))
        elif event == "domain-delete":
            vm = kwargs.get("vm")
            if vm is not None:
                firewall.remove(self.paths.home, vm.name)

    async def _move_logged(self, vm: Any) -> None:
        try:
            await self.move(vm)
        except Exception:  # noqa: BLE001 -- logged; the next change or start repairs it
            log.exception("qube %s: moving it to its new netvm failed", vm.name)
