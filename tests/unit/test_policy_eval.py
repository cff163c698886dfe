"""Deciding calls: Qubes' default policy as a table, @dispvm, tags and types,
first match, ask's choices, redirects, autostart, and the engine that denies
everything while a file is broken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bulkhead.qrexec.policy import PolicyEngine
from bulkhead.qrexec.policy_eval import Decision, QubeInfo, evaluate_rules
from bulkhead.qrexec.policy_parse import load_policy, parse_text

# Qubes' 90-default.policy (qubes-core-admin, R4.1/4.2), as documented, written out here
# so the test does not depend on the file Bulkhead ships.
QUBES_DEFAULT = """\
policy.RegisterArgument *   @anyvm          @anyvm      deny
policy.RegisterArgument *   @anyvm          dom0        deny
qubes.ConnectTCP        *   @anyvm          @anyvm      deny
qubes.FeaturesRequest   *   @anyvm          dom0        allow
qubes.NotifyTools       *   @anyvm          dom0        allow
qubes.Filecopy          *   @anyvm          @anyvm      ask
qubes.GetDate           *   @tag:anon-vm    @anyvm      deny
qubes.GetDate           *   @anyvm          @anyvm      allow target=dom0
qubes.GetRandomizedTime *   @anyvm          dom0        allow
qubes.GetImageRGBA      *   @anyvm          @dispvm     allow
qubes.GetImageRGBA      *   @anyvm          @anyvm      ask
qubes.NotifyUpdates     *   @anyvm          dom0        allow
qubes.OpenInVM          *   @anyvm          @dispvm     allow
qubes.OpenInVM          *   @anyvm          @anyvm      ask
qubes.OpenURL           *   @anyvm          @dispvm     allow
qubes.OpenURL           *   @anyvm          @anyvm      ask
qubes.StartApp          *   @anyvm          @dispvm     allow
qubes.StartApp          *   @anyvm          @anyvm      ask
qubes.SyncAppMenus      *   @anyvm          dom0        allow
qubes.Notifications     *   @anyvm          @default    allow target=dom0
qubes.UpdatesProxy      *   @tag:whonix-updatevm    @default    allow target=sys-whonix
qubes.UpdatesProxy      *   @tag:whonix-updatevm    @anyvm      deny
qubes.UpdatesProxy      *   @type:TemplateVM        @default    allow target=sys-net
qubes.UpdatesProxy      *   @anyvm                  @anyvm      deny
qubes.VMShell           *   @anyvm          @dispvm     allow
qubes.VMShell           *   @anyvm          @anyvm      deny
qubes.VMRootShell       *   @anyvm          @anyvm      deny
qubes.VMExec            *   @anyvm          @dispvm     allow
qubes.VMExec            *   @anyvm          @anyvm      deny
qubes.VMExecGUI         *   @anyvm          @dispvm     allow
qubes.VMExecGUI         *   @anyvm          @anyvm      deny
"""


def line_of(service: str, action: str) -> int:
    """The line of QUBES_DEFAULT with this service and action (1-based)."""
    for lineno, line in enumerate(QUBES_DEFAULT.splitlines(), start=1):
        if line.split()[0] == service and line.split()[4] == action:
            return lineno
    raise LookupError(service)


def qube(name: str, klass: str = "AppVM", **kw: object) -> QubeInfo:
    kw.setdefault("default_dispvm", "default-dvm")
    return QubeInfo(name=name, klass=klass, **kw)  # type: ignore[arg-type]


#: a fresh Qubes install, plus a running disposable and a tagged dvm template
SYSTEM = {q.name: q for q in [
    qube("dom0", "AdminVM"),
    qube("debian-12", "TemplateVM"),
    qube("sys-net", running=True),
    qube("sys-firewall", running=True),
    qube("work", tags=frozenset({"work"}), running=True),
    qube("personal"),
    qube("untrusted", tags=frozenset({"anon-vm"})),
    qube("vault", default_dispvm=None),
    qube("default-dvm", template_for_dispvms=True),
    qube("work-dvm", template_for_dispvms=True, tags=frozenset({"work"})),
    qube("disp42", "DispVM", dispvm_template="default-dvm", running=True),
]}


def decide(policy: str, service: str, source: str, target: str, argument: str = "",
           system: dict[str, QubeInfo] = SYSTEM) -> Decision:
    return evaluate_rules(parse_text(policy, "p"), service, argument, source, target, system)


ANY_VM_CHOICES = ["@dispvm:default-dvm", "@dispvm:work-dvm", "debian-12", "default-dvm",
                  "disp42", "personal", "sys-firewall", "sys-net", "untrusted", "vault",
                  "work-dvm"]


@pytest.mark.parametrize("service, source, target, action, resolved", [
    # file copy: always asked, to any qube but dom0
    ("qubes.Filecopy", "work", "", "ask", "@default"),
    ("qubes.Filecopy", "work", "personal", "ask", "personal"),
    ("qubes.Filecopy", "work", "dom0", "deny", "dom0"),
    # the date: from dom0, whatever the caller asks; never for anonymous qubes
    ("qubes.GetDate", "work", "", "allow", "dom0"),
    ("qubes.GetDate", "work", "personal", "allow", "dom0"),
    ("qubes.GetDate", "untrusted", "", "deny", "@default"),
    # open in a disposable without asking; in another qube after asking
    ("qubes.OpenInVM", "work", "@dispvm", "allow", "@dispvm:default-dvm"),
    # (a named disposable template is not @dispvm: asked)
    ("qubes.OpenInVM", "work", "@dispvm:work-dvm", "ask", "@dispvm:work-dvm"),
    ("qubes.OpenInVM", "work", "personal", "ask", "personal"),
    ("qubes.OpenURL", "untrusted", "@dispvm", "allow", "@dispvm:default-dvm"),
    ("qubes.OpenURL", "untrusted", "vault", "ask", "vault"),
    ("qubes.StartApp", "work", "@dispvm", "allow", "@dispvm:default-dvm"),
    # VMShell only into a disposable made for the call
    ("qubes.VMShell", "work", "@dispvm", "allow", "@dispvm:default-dvm"),
    ("qubes.VMShell", "untrusted", "work", "deny", "work"),
    ("qubes.VMShell", "work", "disp42", "deny", "disp42"),
    ("qubes.VMShell", "work", "dom0", "deny", "dom0"),
    ("qubes.VMRootShell", "work", "@dispvm", "deny", "@dispvm"),
    ("qubes.VMExec", "work", "@dispvm", "allow", "@dispvm:default-dvm"),
    ("qubes.VMExec", "work", "personal", "deny", "personal"),
    ("qubes.VMExecGUI", "work", "@dispvm", "allow", "@dispvm:default-dvm"),
    # into dom0
    ("qubes.FeaturesRequest", "work", "dom0", "allow", "dom0"),
    ("qubes.FeaturesRequest", "work", "@adminvm", "allow", "dom0"),
    ("qubes.FeaturesRequest", "work", "personal", "deny", "personal"),
    ("qubes.SyncAppMenus", "debian-12", "dom0", "allow", "dom0"),
    ("qubes.Notifications", "work", "", "allow", "dom0"),
    ("qubes.Notifications", "work", "dom0", "deny", "dom0"),
    ("policy.RegisterArgument", "work", "dom0", "deny", "dom0"),
    ("qubes.ConnectTCP", "work", "personal", "deny", "personal"),
    # updates: templates through sys-net only
    ("qubes.UpdatesProxy", "debian-12", "", "allow", "sys-net"),
    ("qubes.UpdatesProxy", "work", "", "deny", "@default"),
    ("qubes.UpdatesProxy", "debian-12", "sys-firewall", "deny", "sys-firewall"),
    # not in the policy at all: the Admin API, unknown services
    ("admin.vm.List", "work", "dom0", "deny", "dom0"),
    ("my.Service", "work", "personal", "deny", "personal"),
])
def test_qubes_default_policy(service: str, source: str, target: str, action: str,
                              resolved: str) -> None:
    d = decide(QUBES_DEFAULT, service, source, target)
    assert (d.action, d.target) == (action, resolved), d


def test_the_decision_cites_the_line() -> None:
    d = decide(QUBES_DEFAULT, "qubes.VMShell", "untrusted", "work")
    assert d.origin == f"p:{line_of('qubes.VMShell', 'deny')}" and d.line.split() == "qubes.VMShell * @anyvm @anyvm deny".split()
    assert d.notify is True and d.reason == "denied by policy"
    d = decide(QUBES_DEFAULT, "nothing.Here", "work", "personal")
    assert (d.origin, d.line, d.reason) == ("no matching rule", "",
                                             "no policy rule matches this call")


def test_ask_choices_for_file_copy() -> None:
    d = decide(QUBES_DEFAULT, "qubes.Filecopy", "work", "")
    # any qube but dom0 and the caller itself, and each disposable template as @dispvm:
    assert d.ask_targets == ANY_VM_CHOICES
    assert d.default_target is None and d.origin == f"p:{line_of('qubes.Filecopy', 'ask')}"


def test_ask_choices_drop_what_an_earlier_deny_refuses() -> None:
    policy = ("s * @anyvm vault deny\ns * @anyvm @tag:work deny\ns * work @anyvm ask\n"
              "s * @anyvm @anyvm allow\n")
    d = decide(policy, "s", "work", "personal")
    assert d.action == "ask"
    assert "vault" not in d.ask_targets and "work-dvm" not in d.ask_targets
    assert "personal" in d.ask_targets and "@dispvm:work-dvm" in d.ask_targets


def test_ask_with_target_and_default_target() -> None:
    d = decide("s * @anyvm @anyvm ask target=personal default_target=personal", "s", "work",
               "vault")
    assert (d.action, d.ask_targets, d.default_target, d.target) == (
        "ask", ["personal"], "personal", "vault")
    d = decide("s * @anyvm @default ask default_target=@dispvm\ns * @anyvm @dispvm allow",
               "s", "work", "")
    assert d.default_target == "@dispvm:default-dvm" and d.ask_targets == ["@dispvm:default-dvm"]
    # a default the user cannot choose is no default
    d = decide("s * @anyvm vault deny\ns * @anyvm @anyvm ask default_target=vault", "s",
               "work", "personal")
    assert d.action == "ask" and d.default_target is None


def test_ask_with_nothing_to_choose_denies() -> None:
    d = decide("s * @anyvm @default ask", "s", "work", "")
    assert (d.action, d.reason) == ("deny", "ask, but there is no target to choose from")


def test_ask_for_dispvm_shows_the_template() -> None:
    d = decide("s * @anyvm @anyvm ask", "s", "work", "@dispvm")
    assert d.action == "ask" and d.target == "@dispvm:default-dvm"


def test_ask_to_dom0_offers_dom0() -> None:
    d = decide("s * @anyvm dom0 ask", "s", "work", "dom0")
    assert d.ask_targets == ["dom0"]


# --- @dispvm -----------------------------------------------------------------------------

def test_dispvm_resolves_to_the_callers_default_dispvm() -> None:
    system = dict(SYSTEM, personal=qube("personal", default_dispvm="work-dvm"))
    d = decide("s * @anyvm @dispvm allow", "s", "personal", "@dispvm", system=system)
    assert d.target == "@dispvm:work-dvm"


def test_dispvm_without_a_default_dispvm_is_denied() -> None:
    d = decide("s * @anyvm @dispvm allow", "s", "vault", "@dispvm")
    assert d.action == "deny" and "no default_dispvm" in d.reason


def test_dispvm_name_must_be_a_disposable_template() -> None:
    d = decide("s * @anyvm @anyvm allow", "s", "work", "@dispvm:personal")
    assert d.action == "deny" and "not a disposable template" in d.reason
    d = decide("s * @anyvm @anyvm allow", "s", "work", "@dispvm:nosuch")
    assert d.action == "deny"
    d = decide("s * @anyvm @anyvm allow target=@dispvm:personal", "s", "work", "vault")
    assert d.action == "deny" and "not a disposable template" in d.reason


def test_dispvm_name_rule_matches_dispvm_of_that_default() -> None:
    policy = "s * @anyvm @dispvm:work-dvm allow\ns * @anyvm @anyvm deny"
    assert decide(policy, "s", "work", "@dispvm:work-dvm").action == "allow"
    assert decide(policy, "s", "work", "@dispvm").action == "deny"  # default-dvm
    system = dict(SYSTEM, work=qube("work", default_dispvm="work-dvm"))
    d = decide(policy, "s", "work", "@dispvm", system=system)
    assert (d.action, d.target) == ("allow", "@dispvm:work-dvm")


def test_dispvm_tag_rule() -> None:
    policy = "s * @anyvm @dispvm:@tag:work allow\ns * @anyvm @anyvm deny"
    assert decide(policy, "s", "personal", "@dispvm:work-dvm").target == "@dispvm:work-dvm"
    assert decide(policy, "s", "personal", "@dispvm:default-dvm").action == "deny"
    assert decide(policy, "s", "personal", "@dispvm").action == "deny"
    assert decide(policy, "s", "personal", "work").action == "deny"  # a qube, not a disposable


def test_dispvm_tokens_as_sources() -> None:
    policy = "s * @dispvm:default-dvm @anyvm allow\ns * @dispvm:@tag:work vault allow"
    assert decide(policy, "s", "disp42", "personal").action == "allow"
    assert decide(policy, "s", "default-dvm", "personal").action == "deny"  # not a disposable
    assert decide(policy, "s", "disp42", "vault").action == "allow"  # first line first
    system = dict(SYSTEM, disp7=qube("disp7", "DispVM", dispvm_template="work-dvm"))
    assert decide(policy, "s", "disp7", "vault", system=system).action == "allow"
    assert decide(policy, "s", "disp7", "work", system=system).action == "deny"


# --- tags, types, names, dom0 --------------------------------------------------------------

def test_tags_and_types() -> None:
    policy = ("s * @tag:work @type:TemplateVM allow\ns * @type:DispVM @tag:work allow\n"
              "s * @anyvm @anyvm deny")
    assert decide(policy, "s", "work", "debian-12").action == "allow"
    assert decide(policy, "s", "personal", "debian-12").action == "deny"
    assert decide(policy, "s", "disp42", "work").action == "allow"
    assert decide(policy, "s", "disp42", "work-dvm").action == "allow"
    assert decide(policy, "s", "disp42", "personal").action == "deny"


def test_dom0_is_matched_only_by_name() -> None:
    assert decide("s * @anyvm @anyvm allow", "s", "work", "dom0").action == "deny"
    assert decide("s * @anyvm @type:AdminVM allow", "s", "work", "dom0").action == "deny"
    system = dict(SYSTEM, dom0=qube("dom0", "AdminVM", tags=frozenset({"t"})))
    assert decide("s * @anyvm @tag:t allow", "s", "work", "dom0", system=system).action == "deny"
    assert decide("s * @anyvm dom0 allow", "s", "work", "dom0").target == "dom0"
    assert decide("s * @anyvm @adminvm allow", "s", "work", "dom0").target == "dom0"
    # as a source too
    assert decide("s * @anyvm @anyvm allow", "s", "dom0", "work").action == "deny"
    assert decide("s * @type:AdminVM @anyvm allow", "s", "dom0", "work").action == "deny"
    assert decide("s * dom0 @anyvm allow", "s", "dom0", "work").action == "allow"
    assert decide("s * @adminvm work allow", "s", "dom0", "work").action == "allow"


def test_first_match_wins() -> None:
    policy = "s * work personal deny\ns * @anyvm @anyvm allow\ns * work personal allow"
    d = decide(policy, "s", "work", "personal")
    assert (d.action, d.origin) == ("deny", "p:1")
    assert decide(policy, "s", "vault", "personal").origin == "p:2"


def test_service_and_argument_matching() -> None:
    policy = ("s +one @anyvm @anyvm allow\ns + @anyvm @anyvm ask\ns * @anyvm @anyvm deny\n"
              "* * work vault allow")
    assert decide(policy, "s", "work", "personal", argument="one").action == "allow"
    assert decide(policy, "s", "work", "personal", argument="").action == "ask"
    assert decide(policy, "s", "work", "personal", argument="two").action == "deny"
    assert decide(policy, "t", "work", "vault").origin == "p:4"
    assert decide(policy, "s", "work", "vault", argument="one").origin == "p:1"


def test_invalid_requests_are_denied_before_any_rule() -> None:
    allow_all = "* * @anyvm @anyvm allow"
    for service, source, target, argument in [
            ("a/b", "work", "personal", ""), ("s", "work", "personal", "x/y"),
            ("s", "nosuch", "personal", ""), ("s", "work", "nosuch", ""),
            ("s", "work", "@anyvm", ""), ("s", "work", "@tag:work", ""),
            ("s", "work", "$dispvm", ""), ("", "work", "personal", "")]:
        d = decide(allow_all, service, source, target, argument=argument)
        assert (d.action, d.origin) == ("deny", "request"), (service, source, target, d)


# --- redirects, users, autostart -----------------------------------------------------------

def test_redirect_and_user() -> None:
    d = decide("s * work @default allow target=personal user=root", "s", "work", "")
    assert (d.action, d.target, d.user) == ("allow", "personal", "root")
    d = decide("s * work @anyvm allow target=nosuch", "s", "work", "personal")
    assert d.action == "deny" and "no such qube" in d.reason
    d = decide("s * @anyvm @default allow target=@dispvm", "s", "vault", "")
    assert d.action == "deny" and "no default_dispvm" in d.reason


def test_allow_with_anyvm_and_the_default_target_has_nowhere_to_go() -> None:
    d = decide("s * @anyvm @anyvm allow", "s", "work", "")
    assert d.action == "deny" and "no target" in d.reason


def test_autostart_no() -> None:
    policy = "s * @anyvm @anyvm allow autostart=no\ns * @anyvm dom0 allow autostart=no"
    assert decide(policy, "s", "personal", "work").target == "work"        # running
    d = decide(policy, "s", "work", "personal")                              # halted
    assert d.action == "deny" and "autostart=no" in d.reason
    assert decide(policy, "s", "work", "@dispvm").action == "deny"
    assert decide(policy, "s", "work", "dom0").action == "allow"
    d = decide("s * @anyvm @anyvm ask autostart=no", "s", "personal", "work")
    assert d.ask_targets == ["disp42", "sys-firewall", "sys-net", "work"]
    assert d.autostart is False


# --- the engine: files, reloads, broken files ----------------------------------------------

def test_engine_reads_the_directory_and_follows_changes(tmp_path: Path) -> None:
    (tmp_path / "90-default.policy").write_text(QUBES_DEFAULT)
    engine = PolicyEngine(tmp_path)
    assert engine.errors() == []
    d = engine.evaluate("qubes.VMShell", "", "work", "personal", SYSTEM)
    assert d.action == "deny" and d.origin == f"{tmp_path / '90-default.policy'}:{line_of('qubes.VMShell', 'deny')}"
    user = tmp_path / "30-user.policy"
    user.write_text("qubes.VMShell * work personal allow\n")
    d = engine.evaluate("qubes.VMShell", "", "work", "personal", SYSTEM)
    assert (d.action, d.origin) == ("allow", f"{user}:1")
    user.unlink()
    assert engine.evaluate("qubes.VMShell", "", "work", "personal", SYSTEM).action == "deny"


def test_a_broken_file_denies_every_call(tmp_path: Path) -> None:
    (tmp_path / "90-default.policy").write_text(QUBES_DEFAULT)
    broken = tmp_path / "30-user.policy"
    broken.write_text("qubes.GetDate * @anyvm @anyvm allow target=dom0\nthis is not policy\n")
    engine = PolicyEngine(tmp_path)
    assert engine.errors() == [f"{broken}:2: wrong number of fields (4; SERVICE ARGUMENT SOURCE "
                               f"TARGET ACTION [PARAM=VALUE...])"]
    for service, target in [("qubes.GetDate", ""), ("qubes.OpenInVM", "@dispvm"),
                            ("qubes.Filecopy", "personal")]:
        d = engine.evaluate(service, "", "work", target, SYSTEM)
        assert d.action == "deny" and d.origin == engine.errors()[0]
        assert "every call is denied" in d.reason
    broken.write_text("# fixed\n")
    assert engine.evaluate("qubes.GetDate", "", "work", "", SYSTEM).action == "allow"


def test_a_file_that_cannot_be_read_denies_every_call(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    (tmp_path / "90-default.policy").write_text(QUBES_DEFAULT)
    (tmp_path / "10-x.policy").write_text("")
    (tmp_path / "10-x.policy").chmod(0)
    assert PolicyEngine(tmp_path).evaluate("qubes.GetDate", "", "work", "", SYSTEM).action \
        == "deny"


def test_a_missing_policy_directory_denies_and_recovers(tmp_path: Path) -> None:
    engine = PolicyEngine(tmp_path / "policy.d")
    d = engine.evaluate("qubes.GetDate", "", "work", "", SYSTEM)
    assert d.action == "deny" and "does not exist" in d.origin
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "90-default.policy").write_text(QUBES_DEFAULT)
    assert engine.evaluate("qubes.GetDate", "", "work", "", SYSTEM).action == "allow"


def test_an_included_file_change_is_noticed(tmp_path: Path) -> None:
    (tmp_path / "include").mkdir()
    inc = tmp_path / "include" / "mine"
    inc.write_text("s * @anyvm @anyvm deny\n")
    (tmp_path / "10-a.policy").write_text("!include include/mine\n")
    engine = PolicyEngine(tmp_path)
    assert engine.evaluate("s", "", "work", "personal", SYSTEM).action == "deny"
    inc.write_text("s * @anyvm @anyvm allow\n")
    os.utime(inc, ns=(1, 1))  # a different mtime even within the clock's resolution
    assert engine.evaluate("s", "", "work", "personal", SYSTEM).action == "allow"


def test_the_shipped_default_policy_parses_and_decides_as_qubes() -> None:
    import bulkhead.qrexec as pkg

    shipped = Path(pkg.__file__).parent / "default-policy"
    loaded = load_policy(shipped)
    assert loaded.errors == []
    engine = PolicyEngine(shipped)
    for service, source, target, action in [
            ("qubes.Filecopy", "work", "", "ask"), ("qubes.OpenInVM", "work", "@dispvm", "allow"),
            ("qubes.OpenInVM", "work", "personal", "ask"), ("qubes.OpenURL", "work", "vault", "ask"),
            ("qubes.VMShell", "work", "@dispvm", "allow"), ("qubes.VMShell", "untrusted", "work",
                                                            "deny"),
            ("qubes.GetDate", "work", "", "allow"), ("qubes.ClipboardPaste", "work", "personal",
                                                     "ask"),
            ("admin.vm.List", "work", "dom0", "deny"), ("admin.vm.property.GetAll", "work",
                                                        "personal", "deny")]:
        assert engine.evaluate(service, "", source, target, SYSTEM).action == action, service
    d = engine.evaluate("admin.vm.property.GetAll", "", "work", "dom0", SYSTEM)
    assert d.notify is False
