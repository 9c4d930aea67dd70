"""The controller's exceptions, all under one base.

    OrchestratorError                  one clear line for the user; `hint` says how to fix it
    ├── ConfigError                    experiments.yaml is wrong (file, line, key, did-you-mean)
    ├── BudgetError                    the estimate or the spend would cross the budget
    ├── LedgerError                    the state database cannot be read or written
    │   └── LedgerTooNew               the ledger file was written by a newer orchestrate
    ├── ProviderError                  a provider API call failed (provider, instance, status)
    │   ├── CapacityError              no offer / sold out for the requested GPU
    │   └── InstanceNotFound           the provider does not know this instance
    ├── TransportError                 a command or transfer could not reach the host
    │   ├── ConnectError               cannot connect (after retries); the endpoint is named
    │   ├── HostKeyMismatch            the host key differs from the one pinned to the instance
    │   └── CommandError               a command ran and failed (command, exit code, output tail)
    ├── StagingError                   no mirror works, a checksum fails, an unsafe archive
    │   └── DatasetInvalid             the data is not a NeRF-synthetic scene (fake or broken)
    └── JobError                       a job's payload failed on the host (phase, exit code)

The CLI prints `error: <message>` (and `hint: ...` when given) and exits non-zero; a
traceback reaching a user is a bug. Messages never contain secrets: pass them through
`orchestrator.secrets.redact` when they might.
"""
from __future__ import annotations

import difflib


class OrchestratorError(Exception):
    """Base of every error the controller raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(OrchestratorError):
    exit_code = 2


class BudgetError(OrchestratorError):
    exit_code = 3


class LedgerError(OrchestratorError):
    pass


class LedgerTooNew(LedgerError):
    """The file's schema version is past the migrations this code knows; it is not touched."""


class ProviderError(OrchestratorError):
    def __init__(self, message: str, *, provider: str = "", instance_id: str | None = None,
                 status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.provider = provider
        self.instance_id = instance_id
        self.status = status


class CapacityError(ProviderError):
    pass


class InstanceNotFound(ProviderError):
    pass


class TransportError(OrchestratorError):
    pass


class ConnectError(TransportError):
    pass


class HostKeyMismatch(TransportError):
    pass


class CommandError(TransportError):
    def __init__(self, command: str, exit_code: int, output_tail: str, *, hint: str | None = None) -> None:
        tail = output_tail.strip().splitlines()[-5:]
        msg = f"command failed with exit code {exit_code}: {command}"
        if tail:
            msg += "\n  " + "\n  ".join(tail)
        super().__init__(msg, hint=hint)
        self.command = command
        self.exit_code_remote = exit_code
        self.output_tail = output_tail


class StagingError(OrchestratorError):
    pass


class DatasetInvalid(StagingError):
    exit_code = 2


class JobError(OrchestratorError):
    def __init__(self, message: str, *, job_id: str = "", phase: str = "", exit_code: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.job_id = job_id
        self.phase = phase
        self.remote_exit_code = exit_code


# -- did-you-mean: the one suggestion rule every "unknown X" message uses -----------------------
def _edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) turning `a` into `b`."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def nearest(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    """The closest choice: fewest edits (a swap counts once), then difflib's similarity."""
    if not choices or len(word) > 200:
        return None
    w = word.lower()
    scored = sorted((_edit_distance(w, c.lower()),
                     -difflib.SequenceMatcher(None, w, c.lower()).ratio(), c) for c in choices)
    dist, neg_ratio, best = scored[0]
    if dist <= max(1, len(w) // 3) or -neg_ratio >= 0.6:
        return best
    return None


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """`did you mean 'x'?` for a near miss, else the list of what is allowed."""
    close = nearest(word, choices)
    if close:
        return f"did you mean {close!r}?"
    return "expected one of: " + ", ".join(choices)
