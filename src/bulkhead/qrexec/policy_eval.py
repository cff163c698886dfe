"""Deciding one qrexec call against a list of rules, with Qubes' semantics.

The first rule whose service, argument, source and target match decides;
no match denies.  The call's target is what the caller asked for: a qube
name, ``dom0``/``@adminvm``, ``@default`` (the empty target: "let the
policy choose"), ``@dispvm`` (a disposable of the caller's
``default_dispvm``) or ``@dispvm:NAME``; anything else is denied before any
rule is looked at.

Matching a rule's target against it (Qubes' ``Target.match``):

- a name matches that name; ``@adminvm`` matches dom0;
- ``@anyvm`` matches everything except dom0, ``@default`` and the ``@dispvm``
  forms included (``qubes.Filecopy * @anyvm @anyvm ask`` is what makes
  ``qvm-copy`` without a target ask);
- ``@default`` and ``@dispvm`` match only themselves;
- ``@dispvm:NAME`` matches itself, and ``@dispvm`` when the caller's
  ``default_dispvm`` is NAME;
- ``@dispvm:@tag:T`` matches ``@dispvm:X`` (or ``@dispvm`` resolving to X)
  when X is a disposable template with tag T;
- ``@tag:T``/``@type:T`` match an existing qube other than dom0 with that tag
  or class: a rule must name dom0 (``dom0``/``@adminvm``) to let anything
  call it.

Sources are always real qubes.  dom0 as a source, too, is matched only by
``@adminvm``/``dom0`` (Qubes' docs: "Dom0 can only be matched explicitly").
``@dispvm:NAME`` as a source matches the disposables made from NAME, and
``@dispvm:@tag:T`` those made from a disposable template tagged T.

The *argument* is passed without its ``+``: ``""`` is the empty argument (a
rule's ``+``), ``"ARG"`` matches a rule's ``+ARG``.  That is the form
``QREXEC_SERVICE_ARGUMENT`` has, so the router passes what it will export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .policy_parse import ARGUMENT_RE, SERVICE_RE, Rule
from .policy_tokens import ADMINVM_NAME, Context, Kind, Token, TokenError, parse_token


@dataclass(frozen=True)
class QubeInfo:
    """What the policy needs to know about one qube."""

    name: str
    klass: str
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    #: for autostart=no: a target that is not running is then refused
    running: bool = False
    #: for a DispVM, the disposable template it was made from (``@dispvm:NAME`` sources)
    dispvm_template: str | None = None
    label: str | None = None
    icon: str | None = None


#: every qube, dom0 included, by name
SystemInfo = Mapping[str, QubeInfo]


@dataclass(frozen=True)
class Decision:
    """The policy's answer to one call.

    ``target`` is resolved for allow: a qube name (``dom0`` for the AdminVM)
    or ``@dispvm:NAME`` (make a disposable of NAME).  For ask it is the target
    the caller asked for, normalised (``@default``, a name, ``@dispvm:NAME``),
    and ``ask_targets`` are the choices (names or ``@dispvm:NAME``), with
    ``default_target`` preselected if set.  For deny it is what was asked.
    ``origin`` is ``FILE:LINE`` of the deciding rule, or why no rule decided
    (no match, an invalid target, the parse error that denies every call);
    ``line`` is the rule's text; ``reason`` says why in words.
    """

    action: str
    target: str
    user: str | None = None
    notify: bool = False
    autostart: bool = True
    ask_targets: list[str] = field(default_factory=list)
    default_target: str | None = None
    origin: str = ""
    line: str = ""
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def deny(target: str, origin: str, reason: str, rule: Rule | None = None,
         notify: bool = True) -> Decision:
    return Decision("deny", target, notify=notify, origin=rule.origin if rule else origin,
                    line=rule.text if rule else "", reason=reason)


# --- the requested target ----------------------------------------------------------------

def requested_target(target: str, system: SystemInfo) -> Token:
    """The caller's target as a token, if it names something that exists (TokenError)."""
    if target == "":
        return Token(Kind.DEFAULT)
    token = parse_token(target, Context.INTENDED)
    if token.kind is Kind.NAME:
        info = system.get(token.value)
        if info is None:
            raise TokenError(f"no such qube: {token.value!r}")
        if info.klass == "AdminVM":
            return Token(Kind.ADMINVM)
    if token.kind is Kind.DISPVM_TEMPLATE and not _is_dvm_template(token.value, system):
        raise TokenError(f"{token.value!r} is not a disposable template")
    return token


def _is_dvm_template(name: str, system: SystemInfo) -> bool:
    info = system.get(name)
    return info is not None and info.template_for_dispvms


def _default_dispvm(source: str, system: SystemInfo) -> str | None:
    info = system.get(source)
    return info.default_dispvm if info is not None else None


def _is_admin(name: str, system: SystemInfo) -> bool:
    info = system.get(name)
    return name == ADMINVM_NAME or (info is not None and info.klass == "AdminVM")


# --- matching ----------------------------------------------------------------------------

def source_matches(spec: Token, source: str, system: SystemInfo) -> bool:
    info = system.get(source)
    if info is None:
        return False  # a source is a real qube; an unknown one matches nothing
    if info.klass == "AdminVM":
        # dom0 is matched only by naming it (Qubes: not by @anyvm, @tag:, @type:)
        return spec.kind is Kind.ADMINVM
    if spec.kind is Kind.NAME:
        return spec.value == source
    if spec.kind is Kind.ANYVM:
        return True
    if spec.kind is Kind.TAG:
        return spec.value in info.tags
    if spec.kind is Kind.TYPE:
        return spec.value == info.klass
    if spec.kind in (Kind.DISPVM_TEMPLATE, Kind.DISPVM_TAG):
        # a disposable made from NAME (or from a disposable template tagged T)
        template = system.get(info.dispvm_template or "")
        if info.klass != "DispVM" or template is None:
            return False
        if spec.kind is Kind.DISPVM_TEMPLATE:
            return template.name == spec.value
        return spec.value in template.tags
    return False


def _as_dispvm_template(requested: Token, source: str, system: SystemInfo) -> str | None:
    """The disposable template a ``@dispvm``/``@dispvm:NAME`` request means, if any."""
    if requested.kind is Kind.DISPVM:
        return _default_dispvm(source, system)
    if requested.kind is Kind.DISPVM_TEMPLATE:
        return requested.value
    return None


def target_matches(spec: Token, requested: Token, source: str, system: SystemInfo) -> bool:
    kind = spec.kind
    if kind is Kind.ANYVM:
        return requested.kind is not Kind.ADMINVM
    if kind in (Kind.ADMINVM, Kind.DEFAULT, Kind.DISPVM, Kind.NAME):
        return spec == requested
    if kind in (Kind.DISPVM_TEMPLATE, Kind.DISPVM_TAG):
        template = _as_dispvm_template(requested, source, system)
        if template is None:
            return False
        if kind is Kind.DISPVM_TEMPLATE:
            return template == spec.value
        info = system.get(template)
        return info is not None and info.template_for_dispvms and spec.value in info.tags
    if requested.kind is not Kind.NAME:  # @tag: and @type: match named qubes only
        return False
    info = system.get(requested.value)
    if info is None:
        return False
    return spec.value in info.tags if kind is Kind.TAG else spec.value == info.klass


def rule_matches(rule: Rule, service: str, argument: str, source: str,
                 system: SystemInfo) -> bool:
    """Service, argument and source (not the target: see :func:`target_matches`)."""
    return ((rule.service is None or rule.service == service)
            and (rule.argument is None or rule.argument == "+" + argument)
            and source_matches(rule.source, source, system))


# --- resolving a target ------------------------------------------------------------------

def resolve(token: Token, source: str, system: SystemInfo) -> str:
    """Where an allow sends the call: a qube name or ``@dispvm:NAME`` (TokenError why not)."""
    if token.kind is Kind.ADMINVM:
        return ADMINVM_NAME
    if token.kind is Kind.DEFAULT:
        raise TokenError("no target was given by the caller or the policy")
    if token.kind is Kind.DISPVM:
        template = _default_dispvm(source, system)
        if template is None:
            raise TokenError(f"@dispvm, but {source!r} has no default_dispvm")
        token = Token(Kind.DISPVM_TEMPLATE, template)
    if token.kind is Kind.DISPVM_TEMPLATE:
        if not _is_dvm_template(token.value, system):
            raise TokenError(f"{token.value!r} is not a disposable template")
        return str(token)
    if token.kind is Kind.NAME:
        if token.value not in system:
            raise TokenError(f"no such qube: {token.value!r}")
        return token.value
    raise TokenError(f"{token} cannot be a call's target")  # pragma: no cover -- parser forbids


def _may_skip_autostart(target: str, system: SystemInfo) -> bool:
    """With autostart=no, whether ``target`` can be used as it is (Qubes' rule)."""
    if target.startswith("@dispvm"):
        return False
    if _is_admin(target, system):
        return True
    info = system.get(target)
    return info is not None and info.running


def expand(token: Token, system: SystemInfo) -> set[str]:
    """Every target a rule's target token stands for, for an ask's choices."""
    kind = token.kind
    if kind is Kind.NAME:
        return {token.value} if token.value in system else set()
    if kind in (Kind.ADMINVM, Kind.DISPVM):
        return {str(token)}
    if kind is Kind.ANYVM:
        names = {n for n, q in system.items() if q.klass != "AdminVM"}
        dvms = {f"@dispvm:{n}" for n, q in system.items() if q.template_for_dispvms}
        return names | dvms | {"@dispvm"}
    if kind is Kind.DISPVM_TEMPLATE:
        return {str(token)} if _is_dvm_template(token.value, system) else set()
    if kind is Kind.DISPVM_TAG:
        return {f"@dispvm:{n}" for n, q in system.items()
                if q.template_for_dispvms and token.value in q.tags}
    others = {n: q for n, q in system.items() if q.klass != "AdminVM"}  # dom0: only by name
    if kind is Kind.TAG:
        return {n for n, q in others.items() if token.value in q.tags}
    if kind is Kind.TYPE:
        return {n for n, q in others.items() if q.klass == token.value}
    return set()  # @default: nothing to choose


def targets_for_ask(rules: Sequence[Rule], service: str, argument: str, source: str,
                    system: SystemInfo) -> set[str]:
    """Qubes' ``collect_targets_for_ask``: over all the rules for this call, from the
    last to the first, allow and ask add what their target stands for and deny takes
    it away, so an earlier deny wins over a later allow."""
    targets: set[str] = set()
    for rule in reversed(rules):
        if not rule_matches(rule, service, argument, source, system):
            continue
        expansion = expand(rule.redirect or rule.target, system)
        if rule.action == "deny":
            targets -= expansion
        else:
            targets |= expansion
    if "@dispvm" in targets:
        targets.discard("@dispvm")
        template = _default_dispvm(source, system)
        if template is not None and _is_dvm_template(template, system):
            targets.add(f"@dispvm:{template}")
    if str(Token(Kind.ADMINVM)) in targets:
        targets.discard(str(Token(Kind.ADMINVM)))
        targets.add(ADMINVM_NAME)
    # a call from a qube to itself is not a qrexec call (Qubes refuses loopback)
    targets.discard(source)
    return targets


# --- the decision ------------------------------------------------------------------------

def evaluate_rules(rules: Sequence[Rule], service: str, argument: str, source: str,
                   target: str, system: SystemInfo) -> Decision:
    """The decision for one call (see the module doc for the argument's form)."""
    if not SERVICE_RE.match(service):
        return deny(target, "request", f"invalid service name {service!r}")
    if not ARGUMENT_RE.match("+" + argument):
        return deny(target, "request", f"invalid argument {argument!r}")
    if source not in system:
        return deny(target, "request", f"unknown source qube {source!r}")
    try:
        requested = requested_target(target, system)
    except TokenError as e:
        return deny(target, "request", f"invalid target: {e}")
    for rule in rules:
        if (rule_matches(rule, service, argument, source, system)
                and target_matches(rule.target, requested, source, system)):
            return _apply(rule, rules, service, argument, source, requested, system)
    return deny(_shown(requested), "no matching rule", "no policy rule matches this call")


def _shown(token: Token) -> str:
    """A requested target as decisions report it: dom0 by its name."""
    return ADMINVM_NAME if token.kind is Kind.ADMINVM else str(token)


def _apply(rule: Rule, rules: Sequence[Rule], service: str, argument: str, source: str,
           requested: Token, system: SystemInfo) -> Decision:
    asked = _shown(requested)
    if rule.action == "deny":
        return deny(asked, "", "denied by policy", rule, notify=rule.notify)
    if rule.action == "allow":
        try:
            target = resolve(rule.redirect or requested, source, system)
        except TokenError as e:
            return deny(asked, "", f"allow, but {e}", rule)
        if not rule.autostart and not _may_skip_autostart(target, system):
            return deny(asked, "", f"{target} is not running and the rule says autostart=no",
                        rule)
        return Decision("allow", target, user=rule.user, notify=rule.notify,
                        autostart=rule.autostart, origin=rule.origin, line=rule.text,
                        reason="allowed by policy")
    # ask
    if rule.redirect is not None:
        try:
            choices = {resolve(rule.redirect, source, system)}
        except TokenError as e:
            return deny(asked, "", f"ask, but {e}", rule)
    else:
        choices = targets_for_ask(rules, service, argument, source, system)
    if not rule.autostart:
        choices = {t for t in choices if _may_skip_autostart(t, system)}
    if not choices:
        return deny(asked, "", "ask, but there is no target to choose from", rule)
    default = None
    if rule.default_target is not None:
        try:
            default = resolve(rule.default_target, source, system)
        except TokenError:
            default = None
        if default not in choices:
            default = None  # a default the user could not choose is no default
    display = asked
    if requested.kind is Kind.DISPVM:
        template = _default_dispvm(source, system)
        display = f"@dispvm:{template}" if template else asked
    return Decision("ask", display, user=rule.user, notify=rule.notify,
                    autostart=rule.autostart, ask_targets=sorted(choices),
                    default_target=default, origin=rule.origin, line=rule.text,
                    reason="the user is asked")
