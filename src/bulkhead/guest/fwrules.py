"""Qubes' firewall rules: one line each, ``key=value`` words, parsed strictly.

Shared by both ends: dom0 validates what ``admin.vm.firewall.Set`` receives with
it, and the firewall qube parses what dom0 sends with it again before turning a
rule into nftables (never trusting that the text it got is what dom0 checked).
So this module imports nothing but builtins (it is installed in the guest).

The format is Qubes' (``admin.vm.firewall.Get``/``Set``)::

    action=accept|drop [proto=tcp|udp|icmp] [dst4=A.B.C.D[/N] | dst6=... | dsthost=NAME]
        [dstports=N[-M]] [icmptype=N] [specialtarget=dns] [expire=UNIXTIME] [comment=TEXT]

``comment`` is last and takes the rest of the line.  ``dsthost`` may also hold an
address or CIDR (it is then written back as ``dst4``/``dst6``, as Qubes does).
"""

MAX_RULES = 512
MAX_LINE = 1024
MAX_HOSTNAME = 253
ORDER = ("action", "proto", "dsthost", "dstports", "icmptype", "specialtarget", "expire",
         "comment")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


class RuleError(ValueError):
    """A rule that does not parse; the message names what is wrong."""


def _ipv4(text):
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        return None
    return [int(p) for p in parts]


def parse_cidr4(text):
    """``A.B.C.D`` or ``A.B.C.D/N`` -> canonical ``A.B.C.D/N`` (host bits cleared), or None."""
    addr, sep, plen = text.partition("/")
    octets = _ipv4(addr)
    if octets is None:
        return None
    if sep:
        if not plen.isdigit() or len(plen) > 2 or int(plen) > 32:
            return None
        n = int(plen)
    else:
        n = 32
    value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    mask = (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF if n else 0
    value &= mask
    return "%d.%d.%d.%d/%d" % (value >> 24, (value >> 16) & 255, (value >> 8) & 255,
                               value & 255, n)


def parse_cidr6(text):
    """A plain IPv6 address or CIDR, kept as given after a strict character check."""
    addr, sep, plen = text.partition("/")
    if not addr or ":" not in addr or len(addr) > 39 \
            or not all(c in "0123456789abcdefABCDEF:" for c in addr) or addr.count("::") > 1:
        return None
    if sep and (not plen.isdigit() or len(plen) > 3 or int(plen) > 128):
        return None
    return addr.lower() + ("/" + plen if sep else "/128")


def valid_hostname(name):
    if not name or len(name) > MAX_HOSTNAME or name[0] in "-." or name[-1] == "-":
        return False
    if not set(name) <= _HOST_CHARS or ".." in name:
        return False
    return all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
               for label in name.rstrip(".").split("."))


def _port(text, what):
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) <= 65535:
        raise RuleError("%s: %r is not a port number (1-65535)" % (what, text[:16]))
    return int(text)


def parse_rule(line):
    """One rule line -> dict (keys of ORDER; ``dsthost`` kind in ``dstkind``: dst4, dst6,
    dsthost).  Raises RuleError naming the problem."""
    if len(line) > MAX_LINE:
        raise RuleError("rule longer than %d characters" % MAX_LINE)
    if not line.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in line):
        raise RuleError("rule must be printable ASCII")
    rule = {}
    rest = line.strip()
    while rest:
        if rest.startswith("comment="):
            rule["comment"] = rest[len("comment="):]
            break
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip(" ")
        key, sep, value = word.partition("=")
        if not sep or not value:
            raise RuleError("%r is not key=value" % word[:40])
        if key in ("dst4", "dst6"):
            if "dsthost" in rule:
                raise RuleError("more than one destination (dsthost/dst4/dst6)")
            canon = parse_cidr4(value) if key == "dst4" else parse_cidr6(value)
            if canon is None:
                raise RuleError("%s: %r is not an IPv%s address or network"
                                % (key, value[:45], key[-1]))
            rule["dsthost"], rule["dstkind"] = canon, key
            continue
        if key not in ORDER or key == "comment":
            raise RuleError("unknown rule option %r" % key[:20])
        if key in rule:
            raise RuleError("option %r given twice" % key)
        if key == "action":
            if value not in ("accept", "drop"):
                raise RuleError("action must be accept or drop, not %r" % value[:20])
        elif key == "proto":
            if value not in ("tcp", "udp", "icmp"):
                raise RuleError("proto must be tcp, udp or icmp, not %r" % value[:20])
        elif key == "dsthost":
            canon = parse_cidr4(value)
            kind = "dst4"
            if canon is None:
                canon, kind = parse_cidr6(value), "dst6"
            if canon is None:
                canon, kind = value.lower().rstrip("."), "dsthost"
                if not valid_hostname(canon):
                    raise RuleError("dsthost: %r is not an address, network or host name"
                                    % value[:60])
            rule["dstkind"] = kind
            value = canon
        elif key == "dstports":
            lo, dash, hi = value.partition("-")
            first = _port(lo, "dstports")
            last = _port(hi, "dstports") if dash else first
            if last < first:
                raise RuleError("dstports: range %d-%d is empty" % (first, last))
            value = "%d-%d" % (first, last)
        elif key == "icmptype":
            if not value.isdigit() or len(value) > 3 or int(value) > 255:
                raise RuleError("icmptype must be a number 0-255, not %r" % value[:20])
            value = str(int(value))
        elif key == "specialtarget":
            if value != "dns":
                raise RuleError("specialtarget must be dns, not %r" % value[:20])
        elif key == "expire":
            if not value.isdigit() or len(value) > 12:
                raise RuleError("expire must be a unix time (seconds), not %r" % value[:20])
            value = str(int(value))
        rule[key] = value
    if "action" not in rule:
        raise RuleError("rule has no action (accept or drop)")
    if "dstports" in rule and rule.get("proto") not in ("tcp", "udp"):
        raise RuleError("dstports needs proto=tcp or proto=udp")
    if "icmptype" in rule and rule.get("proto") != "icmp":
        raise RuleError("icmptype needs proto=icmp")
    return rule


def format_rule(rule):
    """A parsed rule in Qubes' canonical spelling (the order of ORDER)."""
    words = []
    for key in ORDER:
        if key not in rule:
            continue
        if key == "dsthost":
            words.append("%s=%s" % (rule.get("dstkind", "dsthost"), rule[key]))
        else:
            words.append("%s=%s" % (key, rule[key]))
    return " ".join(words)


def parse_rules(text):
    """Many lines -> list of rules; raises RuleError("line N: ...")."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) > MAX_RULES:
        raise RuleError("more than %d rules" % MAX_RULES)
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(parse_rule(line))
        except RuleError as e:
            raise RuleError("rule %d: %s" % (i, e)) from None
    return out
