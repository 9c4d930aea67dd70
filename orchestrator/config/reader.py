"""Typed access to the YAML tree with `file:line: key: problem` errors (the one reader).

Every check that several sections share is defined here once: key sets with did-you-mean,
names, currencies, kinds of values.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import did_you_mean
from .limits import name_problem
from .model import NAME_RE, is_secret_key
from .source import YMap, YSeq, fail


class Reader:
    """Typed access to YMap values with file:line:key errors."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def fail(self, m: YMap | YSeq | None, key: str | int | None, path: str, msg: str,
             hint: str | None = None, at_key: bool = False) -> NoReturn:
        line = 0
        if isinstance(m, YMap):
            line = (m.key_lines if at_key else m.value_lines).get(str(key), m.line) if key is not None else m.line
        elif isinstance(m, YSeq):
            line = m.item_lines[key] if isinstance(key, int) and key < len(m.item_lines) else m.line
        fail(self.filename, line, path, msg, hint)

    def mapping(self, parent: YMap | YSeq | None, key: str | int | None, value: Any, path: str) -> YMap:
        if not isinstance(value, YMap):
            self.fail(parent, key, path, f"expected a mapping (key: value lines), got {kind_of(value)}")
        return value

    def keys(self, m: YMap, allowed: tuple[str, ...], path: str,
             elsewhere: Callable[[str], str | None] | None = None) -> None:
        for key in m:
            sub = f"{path}.{key}" if path else key
            if is_secret_key(key):
                self.fail(m, key, sub, "a secret cannot be written in the file; "
                          f"use {key}_env: VAR_NAME or {key}_file: PATH", at_key=True)
            if key not in allowed:
                other = elsewhere(key) if elsewhere else None
                self.fail(m, key, sub, other or f"unknown key; {did_you_mean(key, allowed)}", at_key=True)

    def get(self, m: YMap, key: str, path: str, kind: str, *, required: bool = False,
            default: Any = None, choices: tuple[str, ...] = (), lo: float | None = None,
            lo_open: bool = False, hi: float | None = None) -> Any:
        sub = f"{path}.{key}" if path else key
        if key not in m or m[key] is None:
            if required:
                self.fail(m, None, sub, "missing; it is required")
            return default
        v = m[key]
        if kind == "str":
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or isinstance(v, float) and not math.isfinite(v):
                self.fail(m, key, sub, f"expected text, got {kind_of(v)}")
            v = str(v).strip()
            if not v:
                self.fail(m, key, sub, "must not be empty")
            if choices and v not in choices:
                self.fail(m, key, sub, f"{v!r} is not allowed; {did_you_mean(v, choices)}")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                self.fail(m, key, sub, f"expected true or false, got {kind_of(v)}")
            return v
        if kind in ("int", "num"):
            v = _yaml11_number(v)
            ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
                want = "a whole number" if kind == "int" else "a number"
                self.fail(m, key, sub, f"expected {want}, got {kind_of(v)}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                self.fail(m, key, sub, f"must be {'>' if lo_open else '>='} {lo:g}, got {v}")
            if hi is not None and v > hi:
                self.fail(m, key, sub, f"must be <= {hi:g}, got {v}")
            return float(v) if kind == "num" else int(v)
        raise AssertionError(kind)

    def str_list(self, m: YMap, key: str, path: str, *, check: Callable[[str, int], None] | None = None) -> tuple[str, ...]:
        sub = f"{path}.{key}"
        v = m.get(key)
        if v is None:
            return ()
        if isinstance(v, str):
            v_list, lines = [v], [m.value_lines[key]]
        elif isinstance(v, YSeq):
            v_list, lines = list(v), v.item_lines
        else:
            return self.fail(m, key, sub, f"expected a list of names, got {kind_of(v)}")
        out: list[str] = []
        for i, item in enumerate(v_list):
            if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
                fail(self.filename, lines[i], f"{sub}[{i}]", f"expected a name, got {kind_of(item)}")
            s = str(item).strip()
            if s in out:
                fail(self.filename, lines[i], f"{sub}[{i}]", f"{s!r} is listed twice")
            if check:
                check(s, lines[i])
            out.append(s)
        if not out:
            self.fail(m, key, sub, "must not be an empty list")
        return tuple(out)


_SCI_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml11_number(v: Any) -> Any:
    """`1e3` is text to YAML 1.1 (it wants `1.0e+3`) but a number to anyone writing it: read it
    as one where a number is expected. An integral value counts as a whole number too."""
    if isinstance(v, str) and _SCI_RE.match(v.strip()):
        try:
            f = float(v)
        except (ValueError, OverflowError):
            return v
        return int(f) if f.is_integer() and abs(f) < 2**63 else f
    return v


def kind_of(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (YMap, dict)):
        return "a mapping"
    if isinstance(v, (YSeq, list)):
        return "a list"
    if isinstance(v, str):
        return f"text {v[:40]!r}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} (not a finite number)"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    return type(v).__name__


def check_name(r: Reader, m: YMap, key: str, path: str, what: str, at_key: bool = True) -> None:
    problem = name_problem(key, what)
    if problem:
        r.fail(m, key, path, problem, at_key=at_key)
    if not NAME_RE.match(key):
        r.fail(m, key, path, f"{what} name {key!r} may use only letters, digits, '_', '-' and '.'",
               at_key=at_key)


def check_currency(r: Reader, m: YMap, path: str) -> str:
    cur = r.get(m, "currency", path, "str", default="USD").upper()
    if not re.fullmatch(r"[A-Z]{3}", cur):
        r.fail(m, "currency", f"{path}.currency", f"{cur!r} is not a currency code; use e.g. USD or CNY")
    return cur
