"""`python -m remote_payload <command>`: the payload's entry point on the GPU host.

Subcommands are added by the registrars in `REGISTRARS`: each takes the subparsers object and
adds its parsers with `func(args) -> int` (and optionally `log_level`) as defaults. To add a
subcommand, append a registrar; it should import only light modules (the handler imports the
heavy ones). Errors become one line `error: ...` on stderr and the error's exit code; bad
arguments exit 64.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .errors import USAGE_EXIT_CODE, PayloadError


def _add_own(sub: argparse._SubParsersAction) -> None:
    from .commands import add_commands
    add_commands(sub)


def _add_stage(sub: argparse._SubParsersAction) -> None:
    """`stage` (issue #7): its parser and handler live in remote_payload.stage.cli."""
    p = sub.add_parser("stage", help="fetch a dataset from the fastest mirror into the cache")
    try:
        from .stage import cli
    except Exception as exc:  # noqa: BLE001 - a broken stage module must not take run/watchdog down with it
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            raise PayloadError(f"stage is unavailable in this payload ({reason})")

        p.set_defaults(func=unavailable, log_level=logging.WARNING)
        return
    cli.build_parser(p)
    p.set_defaults(func=cli.run, log_level=logging.WARNING)


REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_own, _add_stage)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT_CODE, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m remote_payload",
                     description="Scene pipeline, bootstrap and watchdog run on the GPU host.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else getattr(args, "log_level", logging.INFO)
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:
        h.setLevel(level)
    for noisy in ("PIL", "matplotlib", "urllib3"):   # per-chunk DEBUG lines would flood log.txt
        logging.getLogger(noisy).setLevel(logging.INFO)
    try:
        return int(args.func(args))
    except PayloadError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as exc:   # a bug: one line for the user, the traceback only with -v
        logging.getLogger(__name__).debug("unexpected failure", exc_info=True)
        text = " ".join(str(exc).split())
        sys.stderr.write(f"error: unexpected {type(exc).__name__}: {text}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
