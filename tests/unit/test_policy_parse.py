"""The qrexec policy parser: every token, action and parameter; every malformed
line named by file and line; the directives and their guards."""

from __future__ import annotations

from pathlib import Path

import pytest

from bulkhead.qrexec.policy_parse import (MAX_INCLUDE_DEPTH, PolicySyntaxError, load_policy,
                                          parse_text)
from bulkhead.qrexec.policy_tokens import Context, Kind, Token, TokenError, parse_token


def rule(line: str):  # one line -> its Rule
    (r,) = parse_text(line, path="t.policy")
    return r


def bad(line: str) -> str:
    """The error a single bad line gives (it must name t.policy:1)."""
    with pytest.raises(PolicySyntaxError) as info:
        parse_text(line, path="t.policy")
    message = str(info.value)
    assert message.startswith("t.policy:1: "), message
    return message


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- tokens ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, value", [
    ("work", Kind.NAME, "work"),
    ("dom0", Kind.ADMINVM, ""),
    ("@adminvm", Kind.ADMINVM, ""),
    ("@anyvm", Kind.ANYVM, ""),
    ("@default", Kind.DEFAULT, ""),
    ("@dispvm", Kind.DISPVM, ""),
    ("@dispvm:default-dvm", Kind.DISPVM_TEMPLATE, "default-dvm"),
    ("@dispvm:@tag:dvm-ok", Kind.DISPVM_TAG, "dvm-ok"),
    ("@tag:work_1", Kind.TAG, "work_1"),
    ("@type:AppVM", Kind.TYPE, "AppVM"),
    ("@type:AdminVM", Kind.TYPE, "AdminVM"),
    ("@type:TemplateVM", Kind.TYPE, "TemplateVM"),
    ("@type:StandaloneVM", Kind.TYPE, "StandaloneVM"),
    ("@type:DispVM", Kind.TYPE, "DispVM"),
])
def test_every_token_in_the_target_column(text: str, kind: Kind, value: str) -> None:
    token = parse_token(text, Context.TARGET)
    assert token == Token(kind, value)


def test_dom0_is_canonically_adminvm() -> None:
    assert str(parse_token("dom0", Context.SOURCE)) == "@adminvm"
    assert str(parse_token("@dispvm:@tag:x", Context.TARGET)) == "@dispvm:@tag:x"


@pytest.mark.parametrize("text, context", [
    ("@default", Context.SOURCE), ("@dispvm", Context.SOURCE),
    ("@anyvm", Context.REDIRECT), ("@tag:x", Context.REDIRECT), ("@type:AppVM", Context.REDIRECT),
    ("@default", Context.REDIRECT), ("@dispvm:@tag:x", Context.REDIRECT),
    ("@anyvm", Context.INTENDED), ("@tag:x", Context.INTENDED),
])
def test_tokens_where_qubes_does_not_allow_them(text: str, context: Context) -> None:
    with pytest.raises(TokenError, match="not allowed"):
        parse_token(text, context)


@pytest.mark.parametrize("text, why", [
    ("@foo", "not a known"), ("@tag:", "needs a value"), ("@type:", "needs a value"),
    ("@dispvm:", "needs a value"), ("@type:AppVm", "must be one of"),
    ("@tag:a b", "not a valid tag"), ("@tag:x/y", "not a valid tag"),
    ("@dispvm:@tag:", "needs a value"), ("@dispvm:1abc", "not a valid qube name"),
    ("@dispvm:dom0", "not a valid qube name"), ("1abc", "not a valid qube name"),
    ("a" * 32, "not a valid qube name"), ("wo$rk", "not a valid qube name"),
])
def test_malformed_tokens(text: str, why: str) -> None:
    with pytest.raises(TokenError, match=why):
        parse_token(text, Context.TARGET)


# --- rules -------------------------------------------------------------------------------

def test_a_full_rule() -> None:
    r = rule("qubes.Filecopy +arg work @dispvm:default-dvm allow target=@dispvm user=root "
             "notify=yes autostart=no")
    assert (r.service, r.argument, r.action, r.user) == ("qubes.Filecopy", "+arg", "allow", "root")
    assert r.source == Token(Kind.NAME, "work")
    assert r.target == Token(Kind.DISPVM_TEMPLATE, "default-dvm")
    assert r.redirect == Token(Kind.DISPVM)
    assert (r.notify, r.autostart) == (True, False)
    assert (r.path, r.lineno, r.origin) == ("t.policy", 1, "t.policy:1")


def test_wildcards_and_the_empty_argument() -> None:
    assert (rule("* * @anyvm @anyvm deny").service, rule("* * @anyvm @anyvm deny").argument) \
        == (None, None)
    assert rule("svc * @anyvm @anyvm deny").argument is None
    assert rule("svc + @anyvm @anyvm deny").argument == "+"
    assert rule("svc +a+b.c-d_e @anyvm @anyvm deny").argument == "+a+b.c-d_e"


def test_defaults_of_each_action() -> None:
    assert (rule("s * @anyvm @anyvm allow").notify, rule("s * @anyvm @anyvm allow").autostart) \
        == (False, True)
    assert rule("s * @anyvm @anyvm deny").notify is True
    assert rule("s * @anyvm @anyvm deny notify=no").notify is False
    r = rule("s * @anyvm @anyvm ask default_target=work target=@dispvm:dvm user=u notify=yes")
    assert (r.default_target, r.redirect, r.user, r.notify) == (
        Token(Kind.NAME, "work"), Token(Kind.DISPVM_TEMPLATE, "dvm"), "u", True)
    assert rule("s * @anyvm @default allow target=dom0").redirect == Token(Kind.ADMINVM)


def test_whitespace_and_comments() -> None:
    rules = parse_text("# a comment\n\n   \t\n  s\t*   @anyvm\t@anyvm  deny  \n  # indented\n",
                       path="t.policy")
    assert [(r.lineno, r.text) for r in rules] == [(4, "s\t*   @anyvm\t@anyvm  deny")]


@pytest.mark.parametrize("line, why", [
    ("s * @anyvm @anyvm", "wrong number of fields"),
    ("s *", "wrong number of fields"),
    ("s * @anyvm @anyvm permit", "invalid action 'permit'"),
    ("s * @anyvm @anyvm Allow", "invalid action"),
    ("s+x * @anyvm @anyvm deny", "invalid service name"),
    ("s/x * @anyvm @anyvm deny", "invalid service name"),
    ("s arg @anyvm @anyvm deny", "must start with '+'"),
    ("s +a/b @anyvm @anyvm deny", "invalid argument"),
    ("* +arg @anyvm @anyvm deny", "a * service takes only a * argument"),
    ("s * @default @anyvm deny", "not allowed as source"),
    ("s * @dispvm @anyvm deny", "not allowed as source"),
    ("s * @anyvm @bogus deny", "not a known @token"),
    ("s * @anyvm @anyvm allow target=@anyvm", "not allowed as target="),
    ("s * @anyvm @anyvm allow target=@tag:x", "not allowed as target="),
    ("s * @anyvm @anyvm ask default_target=@default", "not allowed as target="),
    ("s * @anyvm @anyvm deny target=work", "deny does not take target="),
    ("s * @anyvm @anyvm deny user=root", "deny does not take user="),
    ("s * @anyvm @anyvm deny autostart=no", "deny does not take autostart="),
    ("s * @anyvm @anyvm allow default_target=work", "allow does not take default_target="),
    ("s * @anyvm @anyvm allow color=red", "allow does not take color="),
    ("s * @anyvm @anyvm allow target", "expected NAME=VALUE"),
    ("s * @anyvm @anyvm allow =x", "expected NAME=VALUE"),
    ("s * @anyvm @anyvm allow target=", "has no value"),
    ("s * @anyvm @anyvm allow user=a user=b", "given twice"),
    ("s * @anyvm @anyvm allow notify=true", "only be yes or no"),
    ("s * @anyvm @anyvm ask autostart=1", "only be yes or no"),
    ("s * @anyvm @anyvm allow user=ro;ot", "invalid user"),
    ("s * @anyvm @default allow", "@default target needs target="),
    ("s * @anyvm @anyvm allow,target=work", "invalid action"),
])
def test_malformed_lines_name_the_file_line_and_problem(line: str, why: str) -> None:
    assert why in bad(line)


def test_ask_and_deny_for_default_need_no_target() -> None:
    assert rule("s * @anyvm @default ask").action == "ask"
    assert rule("s * @anyvm @default deny").action == "deny"


# --- directories -------------------------------------------------------------------------

def test_files_are_read_in_c_locale_order_and_others_ignored(tmp_path: Path) -> None:
    write(tmp_path, "50-b.policy", "b * @anyvm @anyvm deny\n")
    write(tmp_path, "10-z.policy", "z * @anyvm @anyvm deny\n")
    write(tmp_path, "50-a_x.policy", "ax * @anyvm @anyvm deny\n")
    write(tmp_path, "50-a.policy", "a * @anyvm @anyvm deny\n")
    write(tmp_path, "README", "not policy at all\n")
    write(tmp_path, ".30-swap.policy", "garbage\n")      # an editor's file: ignored
    write(tmp_path, "20-x.policy.bak", "garbage\n")
    (tmp_path / "include").mkdir()
    loaded = load_policy(tmp_path)
    assert loaded.errors == []
    # C order: '.' (0x2e) sorts before '_' (0x5f)
    assert [r.service for r in loaded.rules] == ["z", "a", "ax", "b"]


def test_an_invalid_file_name_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "30-User.policy", "s * @anyvm @anyvm allow\n")
    loaded = load_policy(tmp_path)
    assert len(loaded.errors) == 1 and "invalid policy file name" in loaded.errors[0]
    assert "30-User.policy" in loaded.errors[0]


def test_every_error_is_collected_with_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, "30-user.policy",
              "s * @anyvm @anyvm deny\nbroken line\n# ok\ns * @anyvm @anyvm maybe\n")
    loaded = load_policy(tmp_path)
    assert loaded.errors == [f"{p}:2: wrong number of fields (2; SERVICE ARGUMENT SOURCE TARGET "
                             f"ACTION [PARAM=VALUE...])",
                             f"{p}:4: invalid action 'maybe' (allow, deny or ask)"]
    assert len(loaded.rules) == 1


def test_missing_directory_and_bad_utf8(tmp_path: Path) -> None:
    assert "does not exist" in load_policy(tmp_path / "nope").errors[0]
    (tmp_path / "10-x.policy").write_bytes(b"# ok\ns * @anyvm @anyvm deny\n# \xff\n")
    assert load_policy(tmp_path).errors == [f"{tmp_path / '10-x.policy'}:3: not valid UTF-8"]


def test_unknown_directive(tmp_path: Path) -> None:
    p = write(tmp_path, "10-x.policy", "!compat-4.0\n!includ foo\n")
    errors = load_policy(tmp_path).errors
    assert errors[0].startswith(f"{p}:1: unknown directive '!compat-4.0'")
    assert errors[1].startswith(f"{p}:2: unknown directive '!includ'")


# --- includes ----------------------------------------------------------------------------

def test_include_relative_to_the_policy_directory(tmp_path: Path) -> None:
    write(tmp_path, "include/mine", "inc * @anyvm @anyvm deny\n")
    write(tmp_path, "10-a.policy", "first * @anyvm @anyvm deny\n!include include/mine\n"
                                   "last * @anyvm @anyvm deny\n")
    loaded = load_policy(tmp_path)
    assert loaded.errors == []
    assert [r.service for r in loaded.rules] == ["first", "inc", "last"]
    assert loaded.rules[1].origin == f"{tmp_path / 'include/mine'}:1"


def test_include_absolute_path(tmp_path: Path) -> None:
    other = write(tmp_path / "elsewhere", "x", "abs * @anyvm @anyvm deny\n")
    write(tmp_path / "p", "10-a.policy", f"!include {other}\n")
    assert [r.service for r in load_policy(tmp_path / "p").rules] == ["abs"]


def test_include_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "10-a.policy", "!include nope\n!include\n!include a b\n"
                                       "!include-dir nodir\n!include-service s * \n")
    errors = load_policy(tmp_path).errors
    assert errors[0] == f"{tmp_path / 'nope'}: No such file or directory"
    assert errors[1] == f"{p}:1: cannot include {tmp_path / 'nope'}"
    assert errors[2] == f"{p}:2: !include takes 1 parameter(s), not 0"
    assert errors[3] == f"{p}:3: !include takes 1 parameter(s), not 2"
    assert errors[4] == f"{p}:4: not a directory: {tmp_path / 'nodir'}"
    assert errors[5] == f"{p}:5: !include-service takes 3 parameter(s), not 2"


def test_an_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "include/bad", "ok * @anyvm @anyvm deny\nbad * @anyvm @anyvm nope\n")
    write(tmp_path, "10-a.policy", "!include include/bad\n")
    assert load_policy(tmp_path).errors == [f"{inc}:2: invalid action 'nope' (allow, deny or ask)"]


def test_include_cycle_is_an_error_not_a_hang(tmp_path: Path) -> None:
    write(tmp_path, "include/a", "!include include/b\n")
    b = write(tmp_path, "include/b", "x * @anyvm @anyvm deny\n!include include/a\n")
    write(tmp_path, "10-a.policy", "!include include/a\n")
    errors = load_policy(tmp_path).errors
    assert len(errors) == 1 and errors[0].startswith(f"{b}:2: include cycle: ")


def test_a_file_including_itself(tmp_path: Path) -> None:
    p = write(tmp_path, "10-a.policy", "!include 10-a.policy\n")
    assert load_policy(tmp_path).errors[0].startswith(f"{p}:1: include cycle")


def test_include_dir_of_the_policy_directory_is_a_cycle(tmp_path: Path) -> None:
    p = write(tmp_path, "10-a.policy", "!include-dir .\n")
    assert load_policy(tmp_path).errors[0].startswith(f"{p}:1: include cycle")


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    for i in range(MAX_INCLUDE_DEPTH + 3):
        write(tmp_path, f"include/f{i}", f"!include include/f{i + 1}\n")
    write(tmp_path, f"include/f{MAX_INCLUDE_DEPTH + 3}", "s * @anyvm @anyvm deny\n")
    write(tmp_path, "10-a.policy", "!include include/f0\n")
    assert any("nested deeper" in e for e in load_policy(tmp_path).errors)


def test_include_dir(tmp_path: Path) -> None:
    write(tmp_path, "extra/20-b.policy", "b * @anyvm @anyvm deny\n")
    write(tmp_path, "extra/10-a.policy", "a * @anyvm @anyvm deny\n")
    write(tmp_path, "extra/notes.txt", "ignored\n")
    write(tmp_path, "10-x.policy", "!include-dir extra\nlast * @anyvm @anyvm deny\n")
    loaded = load_policy(tmp_path)
    assert loaded.errors == [] and [r.service for r in loaded.rules] == ["a", "b", "last"]
    write(tmp_path, "extra/30-Bad.policy", "c * @anyvm @anyvm deny\n")
    errors = load_policy(tmp_path).errors
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / '10-x.policy'}:1: ")
    assert "invalid policy file name" in errors[0]


def test_include_service_old_format(tmp_path: Path) -> None:
    write(tmp_path, "include/admin-ro", "# old format\n$anyvm $adminvm allow,target=dom0\n"
                                        "mgmt @anyvm ask default_target=work\n"
                                        "$include:include/admin-more\n")
    write(tmp_path, "include/admin-more", "$tag:x $anyvm deny\n")
    write(tmp_path, "10-a.policy", "!include-service admin.vm.List + include/admin-ro\n"
                                   "!include-service * * include/admin-more\n")
    loaded = load_policy(tmp_path)
    assert loaded.errors == []
    r = loaded.rules
    assert [(x.service, x.argument, str(x.source), str(x.target), x.action) for x in r] == [
        ("admin.vm.List", "+", "@anyvm", "@adminvm", "allow"),
        ("admin.vm.List", "+", "mgmt", "@anyvm", "ask"),
        ("admin.vm.List", "+", "@tag:x", "@anyvm", "deny"),
        (None, None, "@tag:x", "@anyvm", "deny"),
    ]
    assert r[0].redirect == Token(Kind.ADMINVM) and r[1].default_target == Token(Kind.NAME, "work")


def test_include_service_errors(tmp_path: Path) -> None:
    inc = write(tmp_path, "include/svc", "@anyvm\n!include-dir x\n@anyvm @anyvm nope\n")
    p = write(tmp_path, "10-a.policy", "!include-service bad/svc * include/svc\n"
                                       "!include-service * +arg include/svc\n"
                                       "!include-service s * include/svc\n")
    errors = load_policy(tmp_path).errors
    assert errors[0].startswith(f"{p}:1: invalid service name")
    assert errors[1].startswith(f"{p}:2: a * service takes only a * argument")
    assert errors[2].startswith(f"{inc}:1: wrong number of fields")
    assert errors[3].startswith(f"{inc}:2: only !include is allowed")
    assert errors[4].startswith(f"{inc}:3: invalid action 'nope'")


def test_overrides_validate_a_change_before_it_is_made(tmp_path: Path) -> None:
    a = write(tmp_path, "10-a.policy", "a * @anyvm @anyvm deny\n")
    write(tmp_path, "include/x", "x * @anyvm @anyvm deny\n")
    b = write(tmp_path, "20-b.policy", "!include include/x\n")
    new = tmp_path / "05-new.policy"
    loaded = load_policy(tmp_path, overrides={new: "n * @anyvm @anyvm deny\n", a: None})
    assert loaded.errors == [] and [r.service for r in loaded.rules] == ["n", "x"]
    assert a.exists() and not new.exists()  # nothing written
    errors = load_policy(tmp_path, overrides={tmp_path / "include/x": None}).errors
    assert errors[-1] == f"{b}:1: cannot include {tmp_path / 'include/x'}"
