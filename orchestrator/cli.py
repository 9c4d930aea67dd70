"""`orchestrate`: parsing, logging set-up and the one place errors become exit codes.

Each subcommand is a module in `orchestrator/commands/` with `register(subparsers)`, which adds
its parser and sets `func(args) -> int`; COMMANDS lists them in the order `--help` shows.

Errors: an `OrchestratorError` prints `error: <message>` (and `hint: ...`) and exits with its
`exit_code`; Ctrl-C exits 130; anything else is a bug: one line `internal error: ...` and exit
70, the traceback only with `--debug` or ORCHESTRATE_DEBUG=1.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sqlite3
import sys
import traceback
from types import ModuleType

from .errors import OrchestratorError
from .secrets import redact

COMMANDS: list[str] = ["run", "estimate", "status", "down", "report", "costs", "ssh", "eval", "logs", "offers"]

EXIT_INTERNAL = 70
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 64."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message}\nhint: see `{self.prog} --help`\n")


def _load_commands() -> list[ModuleType]:
    return [importlib.import_module(f"orchestrator.commands.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrate",
                     description="Run Instant-NGP experiments on rented GPU hosts: estimate, rent, "
                                 "stage, run, watch, pull results, always stop paying.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in _load_commands():
        mod.register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is *now*: while the rich live view runs, that is its
    redirect, so log lines appear above the table instead of tearing through it."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("orchestrator").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("paramiko", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_error(exc: OrchestratorError) -> None:
    lines = redact(str(exc)).strip() or type(exc).__name__
    sys.stderr.write(f"error: {lines}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {redact(exc.hint)}\n")


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("ORCHESTRATE_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or args.debug
        setup_logging(args.verbose)
        return int(args.func(args) or 0)
    except OrchestratorError as exc:
        _print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 1
    except sqlite3.DatabaseError as exc:   # the ledger file failed under a command: a fault, not a bug
        from .ledger import ledger_hint
        sys.stderr.write(f"error: the ledger cannot be used: {' '.join(str(exc).split())}\n"
                         f"hint: {ledger_hint(exc)}\n")
        return 1
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes one line and exit 70
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"internal error: {type(exc).__name__}: {redact(' '.join(str(exc).split()))}"
                         f"{'' if debug else ' (rerun with --debug for the traceback)'}\n")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
