"""`orchestrate report [RUN…] [--format md|csv|html|json] [--out PATH] [--json]`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import OrchestratorError
from ..ledger import Ledger
from ..report import FORMATS, write_report

log = logging.getLogger(__name__)

HELP = "results across runs: scene × GPU × backend, cost per dB, published figures, plots"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help=HELP, description=HELP)
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run ids or names ('latest' allowed); all runs when none given")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="md (default), csv, json, or html (a self-contained page)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of stdout (html defaults to ./report.html)")
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"),
                        help="where run directories live when the ledger's paths moved (default ./runs)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        import pandas  # noqa: F401  (the report's tables are pandas frames)
    except ImportError:
        raise OrchestratorError("`orchestrate report` needs pandas, which this install lacks",
                                hint="pip install 'orchestrate[report]'") from None
    fmt = "json" if args.json else (args.format or "md")
    out: Path | None = args.out
    if fmt == "html" and out is None:
        out = Path("report.html")
    ledger = Ledger.open()
    try:
        text = write_report(ledger, list(args.runs) or None, fmt, out,
                            runs_root=args.runs_root if args.runs_root.is_dir() else None)
    finally:
        ledger.close()
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        sys.stderr.write(f"report written to {out}\n")
    return 0
