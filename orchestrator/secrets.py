"""Secrets by reference only: read from an environment variable or a file, never from YAML.

Every secret read through here is remembered so `redact()` can scrub it from any text that
is about to be logged, shown, or stored (errors, the ledger, run directories).
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from .errors import ConfigError

_known: set[str] = set()
_lock = threading.Lock()


def remember(secret: str) -> None:
    if secret and len(secret) >= 4:
        with _lock:
            _known.add(secret)


def looks_like_variable_name(name: str) -> bool:
    """UPPER_CASE_WITH_DIGITS, as environment variables holding secrets are written; anything
    else named in a `*_env` key may be the secret itself and is never echoed."""
    return bool(re.fullmatch(r"[A-Z_][A-Z0-9_]*", name)) and len(name) <= 64


def read_secret(*, env: str | None = None, file: str | None = None, what: str = "secret") -> str:
    """Return the secret named by `env` (an environment variable) or `file` (a path)."""
    if env:
        value = os.environ.get(env)
        if value is None or value == "":
            if not looks_like_variable_name(env):
                # it may be the secret itself, pasted where its variable's name belongs: never
                # repeat it, and scrub it from anything logged later
                remember(env)
                raise ConfigError(f"{what}: no environment variable of that name is set, and it looks "
                                  "like a value rather than a variable name",
                                  hint="put the secret in an environment variable (export NAME=...) "
                                       "and write NAME here, or use a *_file reference")
            raise ConfigError(f"{what}: environment variable {env} is not set",
                              hint=f"export {env}=... before running, or use a *_file reference")
        value = value.strip()
    elif file:
        path = Path(file).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {path}: {exc.strerror or exc}",
                              hint="check the path and its permissions") from None
        if not value:
            raise ConfigError(f"{what}: secret file {path} is empty")
    else:
        raise ConfigError(f"{what}: no *_env or *_file reference given")
    remember(value)
    return value


def redact(text: str) -> str:
    """Replace every known secret in `text` with '***'."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_known, key=len, reverse=True)
    for s in secrets:
        text = text.replace(s, "***")
    return text
