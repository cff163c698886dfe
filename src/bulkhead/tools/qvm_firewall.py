"""qvm-firewall: manage a qube's outbound firewall, as Qubes' tool does.

::

    qvm-firewall VM [list]           # a table, rule numbers from 0
    qvm-firewall VM list --raw       # Qubes' rule lines, as admin.vm.firewall.Get gives them
    qvm-firewall VM add [--before N] RULE...   # e.g. drop dsthost=1.2.3.4 proto=tcp dstports=443
    qvm-firewall VM del --rule-no N  |  qvm-firewall VM del RULE...
    qvm-firewall VM reset            # back to one rule: accept
    qvm-firewall --reload VM         # push the rules to the netvm again

A RULE is ``key=value`` words (``action=`` may be left out before a bare
``accept``/``drop``); ``expire=+SECONDS`` is made absolute here.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from ..client import App
from ..client.toolparser import QubesArgumentParser, run_tool
from ..guest import fwrules

COLUMNS = (("NO", None), ("ACTION", "action"), ("HOST", "dsthost"), ("PROTOCOL", "proto"),
           ("PORT(S)", "dstports"), ("SPECIAL TARGET", "specialtarget"),
           ("ICMP TYPE", "icmptype"), ("EXPIRE", "expire"), ("COMMENT", "comment"))


def get_parser() -> QubesArgumentParser:
    parser = QubesArgumentParser(vmname_nargs=1, prog="qvm-firewall",
                                 description="manage a qube's outbound firewall")
    parser.add_argument("--reload", "-r", action="store_true",
                        help="reload the rules in the netvm (after any change too)")
    parser.add_argument("--raw", action="store_true",
                        help="list: print the rules in Qubes' API format")
    parser.add_argument("--before", type=int, default=None, metavar="N",
                        help="add: insert before rule number N (default: at the end)")
    parser.add_argument("--rule-no", type=int, default=None, metavar="N",
                        help="del: remove rule number N")
    parser.add_argument("command", nargs="?", default="list",
                        choices=("list", "add", "del", "reset"))
    parser.add_argument("rule", nargs="*", metavar="RULE", help="key=value words of a rule")
    return parser


def rule_from_words(words: list[str], now: float | None = None) -> dict[str, str]:
    """``drop dsthost=1.2.3.4`` -> a checked rule; raises fwrules.RuleError."""
    out = []
    comment = None
    for i, word in enumerate(words):
        if word in ("accept", "drop") and "=" not in word:
            word = "action=" + word
        if word.startswith("comment="):
            comment = " ".join([word] + words[i + 1:])
            break
        if word.startswith("expire=+"):
            delta = word[len("expire=+"):]
            if not delta.isdigit():
                raise fwrules.RuleError(f"expire=+{delta}: expected a number of seconds")
            word = f"expire={int((now or time.time()) + int(delta))}"
        out.append(word)
    if comment:
        out.append(comment)
    return fwrules.parse_rule(" ".join(out))


def _table(rules: list[dict[str, str]]) -> str:
    rows = [[h for h, _ in COLUMNS]]
    for n, rule in enumerate(rules):
        row = [str(n)]
        for _, key in COLUMNS[1:]:
            value = rule.get(key or "", "-")
            if key == "expire" and value != "-":
                value = "@" + value
            row.append(value)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def _options_first(args: Sequence[str]) -> list[str]:
    """``VM add --before 0 drop ...``: argparse would end the rule's words at the option;
    options are moved in front so the words after the command stay one rule."""
    front: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for tok in it:
        if tok in ("--before", "--rule-no"):
            front += [tok, next(it, "")]
        elif tok.startswith(("--before=", "--rule-no=")) or tok in ("--raw", "--reload", "-r"):
            front.append(tok)
        else:
            rest.append(tok)
    return front + rest


def main(args: Sequence[str] | None = None, app: App | None = None) -> int:
    parser = get_parser()
    args = _options_first(sys.argv[1:] if args is None else args)

    def body(ns: argparse.Namespace) -> int:
        vm = ns.domains[0]
        client = vm.app

        def get() -> list[dict[str, str]]:
            text = client.call(vm.name, "admin.vm.firewall.Get").decode("ascii")
            return fwrules.parse_rules(text)

        def put(rules: list[dict[str, str]]) -> None:
            text = "".join(fwrules.format_rule(r) + "\n" for r in rules)
            client.call(vm.name, "admin.vm.firewall.Set", payload=text.encode("ascii"))

        try:
            if ns.command == "list":
                rules = get()
                if ns.raw:
                    sys.stdout.write("".join(fwrules.format_rule(r) + "\n" for r in rules))
                else:
                    sys.stdout.write(_table(rules))
            elif ns.command == "add":
                if not ns.rule:
                    parser.error("add needs a RULE")
                rule = rule_from_words(ns.rule)
                rules = get()
                if ns.before is None:
                    rules.append(rule)
                else:
                    if not 0 <= ns.before <= len(rules):
                        parser.error(f"--before {ns.before}: there are {len(rules)} rules")
                    rules.insert(ns.before, rule)
                put(rules)
            elif ns.command == "del":
                rules = get()
                if ns.rule_no is not None:
                    if not 0 <= ns.rule_no < len(rules):
                        parser.error(f"--rule-no {ns.rule_no}: there are {len(rules)} rules")
                    del rules[ns.rule_no]
                elif ns.rule:
                    target = fwrules.format_rule(rule_from_words(ns.rule))
                    kept = [r for r in rules if fwrules.format_rule(r) != target]
                    if len(kept) == len(rules):
                        parser.error(f"no such rule: {target}")
                    rules = kept
                else:
                    parser.error("del needs --rule-no N or a RULE")
                put(rules)
            elif ns.command == "reset":
                put([{"action": "accept"}])
            if ns.reload:
                client.call(vm.name, "admin.vm.firewall.Reload")
        except fwrules.RuleError as e:
            parser.error(f"invalid rule: {e}")
        return 0

    return run_tool(parser, args, app, body)


if __name__ == "__main__":
    sys.exit(main())
