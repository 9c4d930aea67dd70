"""Limits on what experiments.yaml may say, for values that end up somewhere unforgiving.

- Host fields are written into the managed OpenSSH config (which ~/.ssh/config includes) and
  passed to ssh: whitespace, `=`, quotes or `#` in a user or host name would add directives
  (`User root ProxyCommand=...`) and break every ssh on the machine. Only what OpenSSH accepts
  as a plain token passes.
- Names become path components on the host (job directory = experiment-scene-host-axes + a
  hash): a name too long for a file name would fail at mkdir, after an instance was rented.
- Prices are money: a finite number that is not absurd, so estimates and budgets stay numbers.
"""
from __future__ import annotations

import re

MAX_NAME_CHARS = 64             # each name; a job id joins three of them plus the axes
MAX_JOB_ID_CHARS = 200          # + "-<8 hex>" stays under the 255-byte file-name limit
MAX_PRICE_PER_HOUR = 1_000_000.0   # above any rental in any currency (IDR, KRW included)

# what OpenSSH takes as a bare token (no quoting needed) for each host field
SSH_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
SSH_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[?[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?\]?)$")
SSH_ALIAS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

_SSH_FIELDS = {
    "user": (SSH_USER_RE, "a user name of letters, digits, '.', '_' and '-'"),
    "host": (SSH_HOST_RE, "a host name (letters, digits, '.', '-') or an IP address"),
    "ssh_alias": (SSH_ALIAS_RE, "a Host name from your ssh config (letters, digits, '.', '_', '-')"),
}


def ssh_field_problem(key: str, value: str) -> str | None:
    """Why `value` cannot be host field `key` (None when it can). The value is never echoed:
    a field holding a pasted command or secret should not be printed back."""
    rule = _SSH_FIELDS.get(key)
    if rule is None or rule[0].match(value):
        return None
    bad = sorted({ch for ch in value if ch.isspace() or ch in "=\"'#\\,;$`|&<>()*?!"})
    shown = ", ".join("space" if ch == " " else repr(ch) for ch in bad)
    why = f"contains {shown}" if bad else "is not a plain name"
    return (f"{why}; OpenSSH would read it as more than one setting. Expected {rule[1]}")


def ssh_token_ok(value: str) -> bool:
    """True when `value` can be written as an ssh_config argument as is (host, user, port)."""
    return bool(value) and not any(ch.isspace() or ch in "=\"'#\\" or ord(ch) < 32 for ch in value)


def name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot be a host/dataset/experiment/scene name (None when it can)."""
    if name in (".", ".."):
        return f"{what} name {name!r} is reserved (it means a directory); choose another"
    if len(name) > MAX_NAME_CHARS:
        return (f"{what} name is {len(name)} characters long; at most {MAX_NAME_CHARS} "
                "(it becomes part of directory names on the host)")
    return None


def currency_problem(used: list[tuple[str, str]], known: set[str]) -> tuple[str, str] | None:
    """(where, message) for the first currency that would need a rate the catalog lacks. `used`
    holds (currency, where) pairs, where = "file:line: key path". One currency throughout
    needs no rate at all."""
    if len({cur for cur, _ in used}) <= 1:
        return None
    for cur, where in used:
        if cur not in known:
            others = sorted({c for c, _ in used} - {cur})
            return where, (f"no exchange rate for {cur} (this file also uses {', '.join(others)}; "
                           f"rates are known for {', '.join(sorted(known))}); use one currency for "
                           "every host and the budget, or one of those")
    return None
