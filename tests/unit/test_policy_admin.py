"""admin.policy.* through the real Admin API server; atomic writes; the default
policy's installation; the tools (lint, why, log); system_info and the audit line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from bulkhead.app import App
from bulkhead.config import Paths
from bulkhead.qrexec import policy_cli
from bulkhead.qrexec.policy import (PolicyEngine, append_audit, attach_engine, audit_line,
                                    audit_log_of, engine_for, lint, system_info)
from bulkhead.qrexec.policy_default import (default_files, ensure_policy, install_default_policy,
                                            link_etc_policy)
from bulkhead.qrexec.policy_eval import Decision
from bulkhead.qrexec.policy_write import PolicyFiles, token_of, write_atomically
from core_helpers import ServerThread, error, ok, standard_system

GOOD = b"qubes.VMShell * work personal allow\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    policy_dir = tmp_path / "policy.d"
    install_default_policy(policy_dir)

    async def setup(app: App) -> None:
        attach_engine(app, policy_dir)
        await standard_system(app)

    with ServerThread(tmp_path, setup=setup) as s:
        yield s


def pdir(server: ServerThread) -> Path:
    return server.home / "policy.d"


def test_list_and_get(server: ServerThread) -> None:
    names = ok(server.call("dom0", "admin.policy.List")).splitlines()
    assert names == ["50-config-filecopy", "50-config-openinvm", "90-default",
                     "91-admin-default-deny"]
    body = server.call("dom0", "admin.policy.Get", "90-default")[2:]
    token, _, content = body.partition(b"\n")
    assert content == (pdir(server) / "90-default.policy").read_bytes()
    assert token == token_of(content).encode() and token.startswith(b"sha256:")
    assert error(server.call("dom0", "admin.policy.Get", "nosuch")) == (
        "QubesValueError", "Not found: nosuch.policy")


def test_policy_methods_are_dom0_only(server: ServerThread) -> None:
    exc, _ = error(server.call("work", "admin.policy.List"))
    assert exc in ("ProtocolError", "PermissionDenied", "QubesException")


def test_replace_new_any_and_token(server: ServerThread) -> None:
    path = pdir(server) / "30-user.policy"
    assert ok(server.call("dom0", "admin.policy.Replace", "30-user", b"new\n" + GOOD)) == ""
    assert path.read_bytes() == GOOD
    assert error(server.call("dom0", "admin.policy.Replace", "30-user", b"new\n" + GOOD))[1] \
        == "30-user.policy exists but the token is 'new'"
    token = token_of(GOOD).encode()
    changed = b"qubes.VMShell * work vault allow\n"
    ok(server.call("dom0", "admin.policy.Replace", "30-user", token + b"\n" + changed))
    # the old token is stale now: a second editor cannot overwrite unknowingly
    assert "token mismatch" in error(server.call("dom0", "admin.policy.Replace", "30-user",
                                                 token + b"\n" + GOOD))[1]
    ok(server.call("dom0", "admin.policy.Replace", "30-user", b"any\n" + GOOD))
    assert path.read_bytes() == GOOD
    assert "unrecognised token" in error(server.call("dom0", "admin.policy.Replace", "30-user",
                                                     b"md5:x\n" + GOOD))[1]
    assert "token line" in error(server.call("dom0", "admin.policy.Replace", "30-user",
                                             b"any"))[1]
    assert "does not exist" in error(server.call("dom0", "admin.policy.Replace", "31-x",
                                                 token + b"\n" + GOOD))[1]


def test_replace_refuses_what_does_not_parse_and_writes_nothing(server: ServerThread) -> None:
    exc, message = error(server.call("dom0", "admin.policy.Replace", "30-user",
                                     b"any\nqubes.VMShell * work personal perhaps\n"))
    assert exc == "QubesValueError"
    assert message == (f"the policy would not load: {pdir(server) / '30-user.policy'}:1: "
                       f"invalid action 'perhaps' (allow, deny or ask)")
    assert not (pdir(server) / "30-user.policy").exists()
    assert "not valid UTF-8" in error(server.call("dom0", "admin.policy.Replace", "30-user",
                                                  b"any\n\xff\n"))[1]
    assert "cannot include" in error(server.call("dom0", "admin.policy.Replace", "30-user",
                                                 b"any\n!include include/nosuch\n"))[1]


@pytest.mark.parametrize("name", ["30-User", ".hidden", "../escape", "a/b", "x" * 101, "sp ace",
                                  "semi;colon"])
def test_names_are_checked(server: ServerThread, name: str) -> None:
    reply = server.call("dom0", "admin.policy.Replace", name, b"any\n" + GOOD)
    assert reply.startswith(b"2\0")
    assert not any(p.name.startswith("30-User") for p in pdir(server).iterdir())
    assert not (server.home / "escape.policy").exists()


def test_a_change_is_used_by_the_engine_at_once(server: ServerThread) -> None:
    engine = engine_for(server.app)
    system = server.run(_system(server.app))
    assert engine.evaluate("qubes.VMShell", "", "work", "vault", system).action == "deny"
    ok(server.call("dom0", "admin.policy.Replace", "30-user",
                   b"any\nqubes.VMShell * work vault allow\n"))
    d = engine.evaluate("qubes.VMShell", "", "work", "vault", system)
    assert (d.action, d.origin) == ("allow", f"{pdir(server) / '30-user.policy'}:1")
    ok(server.call("dom0", "admin.policy.Remove", "30-user", b"any"))
    assert engine.evaluate("qubes.VMShell", "", "work", "vault", system).action == "deny"


async def _system(app: App) -> Any:
    return system_info(app)


def test_remove(server: ServerThread) -> None:
    ok(server.call("dom0", "admin.policy.Replace", "30-user", b"new\n" + GOOD))
    assert "token mismatch" in error(server.call("dom0", "admin.policy.Remove", "30-user",
                                                 b"sha256:00"))[1]
    ok(server.call("dom0", "admin.policy.Remove", "30-user", token_of(GOOD).encode()))
    assert not (pdir(server) / "30-user.policy").exists()
    assert error(server.call("dom0", "admin.policy.Remove", "30-user", b"any"))[1] \
        == "Not found: 30-user.policy"


def test_include_methods_and_a_still_included_file(server: ServerThread) -> None:
    ok(server.call("dom0", "admin.policy.include.Replace", "mine",
                   b"new\nqubes.VMShell * work personal allow\n"))
    assert ok(server.call("dom0", "admin.policy.include.List")) == "mine\n"
    assert (pdir(server) / "include" / "mine").read_bytes() == GOOD
    ok(server.call("dom0", "admin.policy.Replace", "30-user", b"any\n!include include/mine\n"))
    # an included file must stay valid, and cannot go while it is included
    assert "invalid action" in error(server.call("dom0", "admin.policy.include.Replace", "mine",
                                                 b"any\ns * @anyvm @anyvm nope\n"))[1]
    assert "cannot include" in error(server.call("dom0", "admin.policy.include.Remove", "mine",
                                                 b"any"))[1]
    ok(server.call("dom0", "admin.policy.Remove", "30-user", b"any"))
    ok(server.call("dom0", "admin.policy.include.Remove", "mine", b"any"))
    assert ok(server.call("dom0", "admin.policy.include.List")) == ""


def test_a_policy_broken_by_hand_can_be_repaired_through_the_api(server: ServerThread) -> None:
    (pdir(server) / "30-user.policy").write_text("broken\n")
    ok(server.call("dom0", "admin.policy.Replace", "40-other", b"any\n" + GOOD))
    ok(server.call("dom0", "admin.policy.Replace", "30-user", b"any\n" + GOOD))
    assert engine_for(server.app).errors() == []


def test_replace_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_default_policy(tmp_path)
    target = tmp_path / "30-user.policy"
    target.write_bytes(GOOD)

    def crash(*_: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        PolicyFiles(tmp_path).replace("30-user", b"any\nqubes.VMShell * work vault allow\n")
    monkeypatch.undo()
    assert target.read_bytes() == GOOD  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a temporary file left by a crash (a dot file) is never read as policy
    (tmp_path / ".30-user.policy.new").write_text("half a li")
    assert PolicyEngine(tmp_path).errors() == []
    write_atomically(target, b"# new\n")
    assert target.read_bytes() == b"# new\n"


# --- the default policy --------------------------------------------------------------------

def test_install_default_policy_is_idempotent_and_keeps_edits(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy.d"
    written = install_default_policy(policy_dir)
    assert sorted(p.name for p in written) == sorted(default_files())
    assert (policy_dir / "include").is_dir()
    (policy_dir / "90-default.policy").write_text("# mine now\n")
    (policy_dir / "50-config-filecopy.policy").unlink()
    assert [p.name for p in install_default_policy(policy_dir)] == ["50-config-filecopy.policy"]
    assert (policy_dir / "90-default.policy").read_text() == "# mine now\n"
    assert install_default_policy(policy_dir) == []
    assert lint([policy_dir]) == []


def test_etc_link_only_for_the_default_instance(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "qubes" / "policy.d"
    ensure_policy(tmp_path / "home", etc_dir=etc)
    assert not os.path.lexists(etc)  # a test instance: no link
    assert link_etc_policy(tmp_path / "home" / "policy.d", etc)
    assert etc.resolve() == (tmp_path / "home" / "policy.d").resolve()
    assert (etc / "90-default.policy").is_file()
    assert not link_etc_policy(tmp_path / "other", etc)  # something is there: left alone
    assert etc.resolve() == (tmp_path / "home" / "policy.d").resolve()


# --- tools ---------------------------------------------------------------------------------

def test_lint_names_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "30-good.policy"
    good.write_text("s * @anyvm @anyvm deny\n")
    bad = tmp_path / "40-bad.policy"
    bad.write_text("s * @anyvm @anyvm deny\ns * @anyvm @anyvm allow user=\nx y\n")
    assert lint([good]) == []
    assert lint([bad]) == [f"{bad}:2: parameter user= has no value",
                           f"{bad}:3: wrong number of fields (2; SERVICE ARGUMENT SOURCE TARGET "
                           f"ACTION [PARAM=VALUE...])"]
    upper = tmp_path / "50-Upper.policy"
    upper.write_text("")
    assert "invalid policy file name" in lint([upper])[0]
    assert policy_cli.lint_main([str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    assert policy_cli.lint_main([str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: parameter user= has no value" in err and f"{bad}:3:" in err
    assert policy_cli.lint_main([str(tmp_path)]) == 1  # the directory: bad file and bad name


def test_lint_defaults_to_the_instance_policy(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKHEAD_HOME", str(tmp_path))
    install_default_policy(tmp_path / "policy.d")
    assert policy_cli.lint_main(["-q"]) == 0
    (tmp_path / "policy.d" / "30-user.policy").write_text("nonsense\n")
    assert policy_cli.lint_main([]) == 1


def test_why_through_the_admin_api(server: ServerThread) -> None:
    paths = Paths(home=server.home, socket=server.socket, cache=server.home / "cache")
    decision, text = policy_cli.why(paths, "qubes.VMShell", "work", "@dispvm", None)
    assert (decision.action, decision.target) == ("allow", "@dispvm:default-dvm")
    assert "90-default.policy:" in text and "qubes.VMShell" in text.splitlines()[-1]
    decision, text = policy_cli.why(paths, "qubes.Filecopy+", "work", "''", None)
    assert decision.action == "ask" and "choices:" in text and "@dispvm:default-dvm" in text
    decision, _ = policy_cli.why(paths, "qubes.GetDate", "work", "@default", None)
    assert decision.target == "dom0"
    decision, _ = policy_cli.why(paths, "admin.vm.List", "work", "dom0", None)
    assert decision.action == "deny" and decision.origin == "no matching rule"


def test_why_cli(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BULKHEAD_HOME", str(server.home))
    monkeypatch.setenv("BULKHEAD_SOCKET", str(server.socket))
    assert policy_cli.main(["why", "qubes.VMShell", "vault", "work"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deny: qubes.VMShell+ from vault to work")
    assert "decided by: " in out and "90-default.policy:" in out
    assert out.splitlines()[-1].split() == "qubes.VMShell * @anyvm @anyvm deny".split()


def test_system_info_from_the_app_and_from_the_api(server: ServerThread) -> None:
    def setup() -> None:
        server.app.domains["work"].tags.add("secret")

    server.loop.call_soon_threadsafe(setup)
    system = server.run(_system(server.app))
    assert system["dom0"].klass == "AdminVM"
    assert system["default-dvm"].template_for_dispvms is True
    assert system["work"].default_dispvm == "default-dvm"
    assert "secret" in system["work"].tags and system["work"].label == "blue"
    from bulkhead.client.app import App as ClientApp
    from bulkhead.client.connection import Connection

    remote = policy_cli.system_info_from_client(ClientApp(Connection(str(server.socket))))
    assert set(remote) == set(system)
    for name, info in system.items():
        mine = remote[name]
        assert (mine.klass, mine.tags, mine.default_dispvm, mine.template_for_dispvms,
                mine.running) == (info.klass, info.tags, info.default_dispvm,
                                  info.template_for_dispvms, info.running), name


# --- audit ---------------------------------------------------------------------------------

def test_audit_line_and_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    d = Decision("deny", "work", origin="/p/90-default.policy:66",
                 line="qubes.VMShell * @anyvm @anyvm deny", reason="denied by policy")
    line = audit_line(d, "qubes.VMShell", "", "untrusted", "work", now=0)
    assert line == ('1970-01-01T00:00:00Z deny source=untrusted target=work '
                    'service=qubes.VMShell argument=\'\' resolved=work '
                    'origin=/p/90-default.policy:66 line="qubes.VMShell * @anyvm @anyvm deny" '
                    'reason="denied by policy"')
    # nothing a qube sends can start a new line or fake a field
    forged = audit_line(d, "s", "x\nallow source=dom0", "work", "a b\x1b", now=0)
    assert "\n" not in forged and "\\x0a" in forged and "target=a\\x20b\\x1b" in forged
    ask = Decision("ask", "@default", ask_targets=["personal", "vault"], origin="p:1")
    assert "choices=personal,vault" in audit_line(ask, "s", "", "work", "", now=0)

    monkeypatch.setenv("BULKHEAD_HOME", str(tmp_path))
    assert policy_cli.main(["log"]) == 0
    assert "no qrexec call logged yet" in capsys.readouterr().out
    for i in range(60):
        append_audit(audit_log_of(tmp_path), f"line {i}")
    assert policy_cli.main(["log", "-n", "3"]) == 0
    assert capsys.readouterr().out == "line 57\nline 58\nline 59\n"
    assert policy_cli.main(["log"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 50


def test_ensure_policy_links_etc_for_the_default_home(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import bulkhead.qrexec.policy_default as policy_default

    home = tmp_path / "var" / "lib" / "bulkhead"
    monkeypatch.setattr(policy_default, "DEFAULT_HOME", home)
    etc = tmp_path / "etc" / "qubes" / "policy.d"
    written = policy_default.ensure_policy(home, etc_dir=etc)
    assert etc.is_symlink() and Path(os.readlink(etc)) == home / "policy.d"
    assert {p.name for p in written} == set(default_files())
    assert policy_default.ensure_policy(home, etc_dir=etc) == []  # idempotent


def test_bulkhead_policy_subcommand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead import cli

    monkeypatch.setenv("BULKHEAD_HOME", str(tmp_path))
    append_audit(audit_log_of(tmp_path), "one call")
    assert cli.main(["policy", "log", "-n", "1"]) == 0
    assert capsys.readouterr().out == "one call\n"
    install_default_policy(tmp_path / "policy.d")
    assert cli.main(["policy", "lint"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["policy", "--help"])
    assert "why" in capsys.readouterr().out
