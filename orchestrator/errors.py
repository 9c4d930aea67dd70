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
