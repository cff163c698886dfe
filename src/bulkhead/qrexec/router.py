"""Routing a qrexec call one qube makes to another, under dom0's policy.

A qube's agent asks for a call (a CALL frame on a channel of its own: see
:mod:`bulkhead.guest.protocol`).  dom0, never the qube, says who is calling:
the source is the qube whose link the request came on.  Then:

1. the policy decides (:mod:`bulkhead.qrexec.policy`); ``ask`` goes to the
   prompt (:mod:`bulkhead.qrexec.ask`), and no answer in time is a deny;
2. every decision is written to the audit log (``bulkhead policy log``);
3. if allowed: the target is started if it must be (``autostart``), or a
   disposable is made for ``@dispvm``; the service starts in the target
   with ``QREXEC_REMOTE_DOMAIN`` set to the source;
4. the two calls are joined: the caller's input to the service, the
   service's output to the caller, each with the credit of both links (so
   the slower side paces the faster), a clean end-of-file each way and the
   service's exit code back to the caller;
5. a refused call ends with an error message and exit code 126, as Qubes'
   ``qrexec-client-vm`` reports it.

If the caller goes away, the service is hung up (SIGHUP, then SIGKILL), as
``qvm-run``'s relay does; a disposable made for the call is destroyed when
the call ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from ..agentlink import REFUSED, AgentLinkError, Call
from ..guest import protocol as P
from ..ratelimit import qube_log
from . import audit
from .ask import AskBroker

if TYPE_CHECKING:  # pragma: no cover
    from .policy import Decision, PolicyEngine

log = logging.getLogger(__name__)

#: seconds a hung-up service has to end before it is killed
HANGUP_GRACE = 5.0
#: the user services run as unless the policy says otherwise (Qubes' default)
DEFAULT_USER = "user"
#: what the relay takes from one side at once: all that has come (up to a data disk's
#: slot), so that the other side gets it in one DATA frame and one disk read rather
#: than one per frame that came in (see bulkhead.datadisk)
RELAY_CHUNK = 1024 * 1024
#: the largest request a qube may send to the Admin API
ADMIN_PAYLOAD_MAX = 1024 * 1024


def _get_date() -> str:
    """qubes.GetDate: dom0's time, as ``date -u -Iseconds`` prints it."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds") + "\n"


#: the services dom0 itself answers (besides the Admin API), by name
DOM0_SERVICES = {"qubes.GetDate": _get_date}


class Refused(Exception):
    """The call does not go ahead; the message is for the caller."""


class Router:
    """Decides and joins the qrexec calls qubes make; one per daemon."""

    def __init__(self, app: Any, policy: "PolicyEngine", broker: AskBroker | None = None) -> None:
        self.app = app
        self.policy = policy
        self.broker = broker or AskBroker(app)

    async def route(self, call: Call, untrusted_target: str, untrusted_service: str) -> None:
        """Handle one call (the agent link's ``on_call``); ends it with an exit code."""
        source = call.link.qube                       # from the channel, never the request
        service, _, argument = untrusted_service.partition("+")
        try:
            if service.startswith("bulkhead."):
                raise Refused("Bulkhead's own methods are dom0's alone")
            decision = await self._decide(source, untrusted_target, service, argument)
            if decision.target == "dom0":
                if service.startswith("admin."):
                    await self._admin_call(call, source, service, argument, untrusted_target)
                    return
                builtin = DOM0_SERVICES.get(service)
                if builtin is None:
                    raise Refused(f"dom0 has no service {service!r}")
                await call.write(builtin().encode(), P.STDOUT)
                await call.finish(0)
                return
            target_vm, disposable = await self._target(decision, source)
        except Refused as e:
            await call.finish(REFUSED, f"Request refused: {e}")
            return
        try:
            await self._run(call, target_vm, decision, untrusted_service, source)
        finally:
            if disposable:
                asyncio.ensure_future(self._destroy(target_vm))

    # --- deciding -------------------------------------------------------------------
    async def _decide(self, source: str, untrusted_target: str, service: str,
                      argument: str) -> "Decision":
        from .policy import system_info

        decision = self.policy.evaluate(service, argument, source, untrusted_target,
                                        system_info(self.app))
        if decision.action == "ask":
            answer = await self.broker.ask(source, untrusted_target, service, argument, decision)
            audit.record(self.app, source, untrusted_target, service, argument, decision,
                         answer=answer)
            if answer is None:
                raise Refused("the user denied it (or did not answer in time)")
            decision = dataclasses.replace(decision, action="allow", target=answer)
        else:
            audit.record(self.app, source, untrusted_target, service, argument, decision)
        if decision.action != "allow":
            raise Refused(f"denied by policy ({decision.origin})")
        return decision

    async def _target(self, decision: "Decision", source: str) -> tuple[Any, bool]:
        """The qube to run the service in, started; and whether it is a disposable made now."""
        name = decision.target
        if name.startswith("@dispvm:"):
            from ..disposable import get_disposable

            base = self.app.domains.get(name[len("@dispvm:"):])
            if base is None:
                raise Refused(f"no disposable template {name[8:]!r}")
            vm = await get_disposable(self.app, base)   # a preloaded one if ready
            try:
                if vm.is_halted():
                    await vm.start()
            except Exception as e:  # noqa: BLE001 -- reported to the caller
                await self._destroy(vm)
                raise Refused(f"the disposable could not start: {e}") from None
            return vm, True
        vm = self.app.domains.get(name)
        if vm is None:
            raise Refused(f"no qube named {name!r}")
        if getattr(vm, "qid", None) == 0:
            raise Refused("services in dom0 are not served to qubes")
        if not vm.is_running():
            if not decision.autostart:
                raise Refused(f"{name!r} is not running and the policy says autostart=no")
            try:
                await vm.start()
            except Exception as e:  # noqa: BLE001 -- reported to the caller
                raise Refused(f"{name!r} could not start: {e}") from None
        return vm, False

    async def _admin_call(self, call: Call, source: str, method: str, argument: str,
                          untrusted_dest: str) -> None:
        """An Admin API call the policy let a qube make: served here, in dom0, with the
        qube as its source; the request's payload is the caller's input, the reply
        (Qubes' ``0\\0...`` / ``2\\0...``) its output."""
        server = getattr(self.app, "admin_server", None)
        if server is None:
            raise Refused("the Admin API is not served to qubes by this daemon")
        untrusted_payload = bytearray()
        while True:
            kind, value = await call.next_event()
            if kind == "stdin":
                assert isinstance(value, bytes)
                untrusted_payload += value
                if len(untrusted_payload) > ADMIN_PAYLOAD_MAX:
                    raise Refused(f"an Admin API payload over {ADMIN_PAYLOAD_MAX} bytes")
            elif kind == "eof":
                break
            else:
                return  # the caller went away
        dest = "dom0" if untrusted_dest in ("@adminvm", "@default", "") else untrusted_dest
        reply = await server.call_from_qube(source, method, argument, dest,
                                            bytes(untrusted_payload))
        await call.write(reply, P.STDOUT)
        await call.finish(0)

    async def _destroy(self, vm: Any) -> None:
        from ..disposable import destroy_disposable

        try:
            await destroy_disposable(self.app, vm)
        except Exception:  # noqa: BLE001 -- logged; the next daemon start cleans up too
            log.exception("cannot destroy the disposable %s", vm.name)

    # --- joining ----------------------------------------------------------------------
    async def _run(self, call: Call, vm: Any, decision: "Decision", service: str,
                   source: str) -> None:
        try:
            link = await self.app.lifecycle.agent(vm)
            target = await link.service(decision.user or DEFAULT_USER, service, source)
        except Exception as e:  # noqa: BLE001 -- the target's agent: reported to the caller
            await call.finish(REFUSED, f"cannot start {service} in {vm.name!r}: {e}")
            return
        await join(call, target)


async def join(caller: Call, service: Call) -> None:
    """Relay between an inbound call (the caller) and the service it asked for."""
    inbound = asyncio.ensure_future(_caller_to_service(caller, service))
    error: str | None = None
    try:
        while True:
            await caller.wait_credit(caller.window // 2)      # batches: see Call.wait_credit
            event = asyncio.ensure_future(service.next_event(RELAY_CHUNK))
            await asyncio.wait({event, inbound}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():          # the caller went away: nobody waits for the service
                event.cancel()
                qube_log(log, caller.link.qube, logging.INFO,
                         "qube %s: its qrexec call ended before the service did",
                         caller.link.qube)
                return
            kind, value = event.result()
            if kind in ("stdout", "stderr"):
                assert isinstance(value, bytes)
                await caller.write(value, P.STDOUT if kind == "stdout" else P.STDERR)
            elif kind == "error":
                assert isinstance(value, str)
                error = value
            elif kind == "exit":
                assert isinstance(value, int)
                await caller.finish(value, error)
                return
    except AgentLinkError:
        pass
    finally:
        inbound.cancel()
        if not service.done:
            service.abandon()
            asyncio.ensure_future(service.hang_up(HANGUP_GRACE))
        if not caller.done:
            await caller.finish(REFUSED, error or "the service's qube went away")


async def _caller_to_service(caller: Call, service: Call) -> None:
    """The caller's input to the service; returns only when the caller's call failed."""
    granted = False
    try:
        while True:
            await service.wait_credit(service.window // 2)    # batches: see Call.wait_credit
            kind, value = await caller.next_event(RELAY_CHUNK)
            if kind == "stdin":
                assert isinstance(value, bytes)
                if not granted and service.link.data_disk is not None:
                    # The service's side takes a data disk slot's worth at once: let
                    # the caller send as much ahead, or its credit (the usual window)
                    # paces the relay.  (Not before its first bytes: a call without
                    # input costs no frame more.)
                    granted = True
                    await caller.grant(RELAY_CHUNK - P.WINDOW)
                await service.write(value)
            elif kind == "eof":
                await service.close_stdin()
            else:  # "error", "exit": the caller's link failed
                return
    except AgentLinkError:
        await asyncio.Event().wait()      # the service's side ends the join
