"""Which qube gives which its network: ``netvm`` and ``provides_network``.

A qube's ``netvm`` is the qube that routes its traffic (sys-firewall for an
AppVM, sys-net for sys-firewall); ``None`` means no network at all (vault).
The rules are Qubes':

- a netvm must have ``provides_network=True``;
- there are no loops (a qube cannot reach the network through itself);
- a running qube can only be switched to a running netvm;
- a netvm with running clients cannot stop unless forced, nor stop
  providing network while it has clients;
- starting a qube starts its netvm first (see QubesVM.start).

Making the links themselves (taps, routes, firewall rules) is the network
code's business: it listens to ``property-set:netvm``,
``property-reset:netvm``, ``domain-start``...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from ..errors import (QubesPropertyValueError, QubesVMError, QubesVMInUseError,
                      QubesVMNotStartedError)
from ..events import handler
from ..network import addressing
from ..properties import Property, PropertyHolder, VMProperty

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App
    from .base import BaseVM

_UNSET: Any = object()


def upstream(vm: "BaseVM", default_netvm: Any = _UNSET) -> Iterator["BaseVM"]:
    """The netvms ``vm``'s traffic passes through, nearest first.

    ``default_netvm`` overrides the global default, to check a change before
    it is made.  Stops at the first repeat, so it is safe on a broken chain.
    """
    seen: set[int] = {id(vm)}
    current: Any = vm
    while True:
        if default_netvm is not _UNSET and current.property_is_default("netvm") \
                and _uses_global_default(current):
            nxt = default_netvm
        else:
            nxt = getattr(current, "netvm", None)
        if nxt is None:
            return
        yield nxt
        if id(nxt) in seen or not hasattr(nxt, "netvm"):
            return
        seen.add(id(nxt))
        current = nxt


def _uses_global_default(vm: Any) -> bool:
    """True if an unset ``netvm`` of ``vm`` means the global default_netvm."""
    return getattr(type(vm), "netvm_follows_default", False)


def setter_netvm(vm: Any, prop: Property, value: Any) -> Any:
    if value is None:
        return None
    if not value.provides_network:
        raise QubesPropertyValueError(vm, "netvm", value.name,
                                      f"The {value.name!r} qube does not provide network "
                                      f"(provides_network is False)")
    if value is vm or any(hop is vm for hop in upstream(value)):
        raise QubesPropertyValueError(vm, "netvm", value.name,
                                      "Loops in network are unsupported")
    return value


def default_netvm_of(vm: Any) -> Any:
    """An unset netvm is the global default, except on the default netvm itself."""
    value = vm.app.default_netvm
    return None if value is vm else value


def connected_vms(netvm: Any) -> list[Any]:
    """The qubes whose netvm is ``netvm`` (directly)."""
    return [vm for vm in netvm.app.domains if getattr(vm, "netvm", None) is netvm]


def is_networked(vm: Any) -> bool:
    """Qubes' test: a qube has an address if it has a netvm or gives network."""
    return bool(getattr(vm, "provides_network", False)) or getattr(vm, "netvm", None) is not None


def _setter_ipv4(vm: Any, prop: Property, value: str) -> str:
    parts = value.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise QubesPropertyValueError(vm, prop.name, value,
                                      f"{prop.name} must be an IPv4 address like 10.137.0.5")
    return ".".join(str(int(p)) for p in parts)


def _setter_mac(vm: Any, prop: Property, value: str) -> str:
    parts = value.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p)
                                  for p in parts) or int(parts[0], 16) & 1:
        raise QubesPropertyValueError(vm, prop.name, value,
                                      "mac must be a unicast MAC address like 00:16:3e:5e:6c:05")
    return ":".join(parts)


class NetVMMixin(PropertyHolder):
    """``netvm`` and ``provides_network`` for QubesVM, with Qubes' rules; the addresses
    (``ip``, ``visible_*``, ``gateway``, ``mac``, ``dns``) as Qubes derives them."""

    #: an unset netvm means app.default_netvm (TemplateVM: no network by default)
    netvm_follows_default = True

    provides_network = Property(
        type=bool, default=False,
        doc="If True, this qube can be the netvm of other qubes (sys-net, sys-firewall).")
    netvm = VMProperty(
        allow_none=True, default=default_netvm_of, setter=setter_netvm,
        doc="The qube that gives this qube its network; empty for no network. "
            "Default: the global default_netvm.")

    ip = Property(default=lambda vm: addressing.ip_of(vm) if is_networked(vm) else None,
                  setter=_setter_ipv4,
                  doc="The qube's IPv4 address (10.137.X.Y from its qid, 10.138.X.Y for a "
                      "disposable); empty without network.")
    visible_ip = Property(read_only=True, default=lambda vm: vm.ip,
                          doc="The address the qube sees as its own.")
    visible_netmask = Property(read_only=True,
                               default=lambda vm: addressing.NETMASK if vm.netvm else None,
                               doc="The netmask the qube sees: a /32, every packet goes "
                                   "through its netvm.")
    visible_gateway = Property(read_only=True,
                               default=lambda vm: vm.netvm.gateway if vm.netvm else None,
                               doc="The qube's default gateway: its netvm's address.")
    gateway = Property(read_only=True,
                       default=lambda vm: vm.visible_ip if vm.provides_network else None,
                       doc="The gateway this qube gives its clients (its own address, "
                           "if it provides network).")
    mac = Property(default=lambda vm: addressing.qube_mac(int(vm.qid)) if int(vm.qid) > 0
                   else None, setter=_setter_mac,
                   doc="MAC address of the qube's network interface.")
    dns = Property(read_only=True,
                   default=lambda vm: " ".join(addressing.DNS_SERVERS) if vm.netvm else None,
                   doc="The DNS servers the qube uses (virtual; its netvm redirects them).")

    if TYPE_CHECKING:  # pragma: no cover
        app: App
        name: str

        def is_running(self) -> bool: ...
        def is_halted(self) -> bool: ...

    @property
    def connected_vms(self) -> list[Any]:
        return connected_vms(self)

    def _check_attach(self, newvalue: Any) -> None:
        if newvalue is not None and self.is_running() and not newvalue.is_running():
            raise QubesVMNotStartedError(
                newvalue, f"Cannot dynamically attach to stopped NetVM: {newvalue.name!r}")
        network = getattr(self.app.lifecycle, "network", None)
        if newvalue is not None and network is not None and self.is_running() \
                and self.name not in network.links:
            raise QubesVMError(
                self, f"{self.name!r} started without a network device: shut it down, "
                      f"set its netvm to {newvalue.name!r}, and start it again")

    @handler("property-pre-set:netvm")
    def _on_pre_set_netvm(self, event: str, name: str, newvalue: Any, oldvalue: Any = None) -> None:
        self._check_attach(newvalue)

    @handler("property-pre-reset:netvm")
    def _on_pre_reset_netvm(self, event: str, name: str, oldvalue: Any = None) -> None:
        newvalue = self.property_get_default("netvm")
        if newvalue is not None:
            setter_netvm(self, type(self).netvm, newvalue)
        self._check_attach(newvalue)

    @handler("property-pre-set:provides_network")
    def _on_pre_set_provides_network(self, event: str, name: str, newvalue: bool,
                                     oldvalue: Any = None) -> None:
        if newvalue:
            return
        clients = connected_vms(self)
        if clients:
            raise QubesPropertyValueError(
                self, "provides_network", newvalue,
                f"The qube is still the netvm of: {', '.join(vm.name for vm in clients)}")
        if self.app.default_netvm is self:
            raise QubesPropertyValueError(
                self, "provides_network", newvalue,
                "The qube is the global default_netvm; change default_netvm first")

    @handler("domain-pre-shutdown")
    def _on_pre_shutdown(self, event: str, force: bool = False, **kwargs: Any) -> None:
        if force:
            return
        running = [vm for vm in connected_vms(self) if not vm.is_halted()]
        if running:
            raise QubesVMInUseError(
                self, "There are other VMs connected to this VM: "
                      + ", ".join(vm.name for vm in running))


# --- the global default_netvm (a property of the app) ------------------------

def setter_default_netvm(app: Any, prop: Property, value: Any) -> Any:
    if value is None:
        return None
    if not value.provides_network:
        raise QubesPropertyValueError(app, "default_netvm", value.name,
                                      f"The {value.name!r} qube does not provide network")
    if any(hop is value for hop in upstream(value, default_netvm=value)):
        raise QubesPropertyValueError(
            app, "default_netvm", value.name,
            f"{value.name!r} would reach the network through itself: set its netvm "
            f"explicitly before making it the default")
    return value


def check_default_netvm_change(app: "App", newvalue: Any) -> None:
    """Running qubes that use the default netvm must not be moved to a halted one."""
    if newvalue is None or newvalue.is_running():
        return
    for vm in app.domains:
        if getattr(type(vm), "netvm_follows_default", False) and vm.property_is_default("netvm") \
                and vm is not newvalue and vm.is_running():
            raise QubesVMNotStartedError(
                newvalue, f"Cannot dynamically attach {vm.name!r} to stopped NetVM: "
                          f"{newvalue.name!r}")
