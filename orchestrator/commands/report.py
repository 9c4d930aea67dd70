"""`orchestrate report [RUN…] [--format md|csv|html|json] [--out PATH] [--json]`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..ledger import Ledger
from ..report import FORMATS, write_report

log = logging.getLogger(__name__)

NAME = "report"
HELP = "results across runs: scene × GPU × backend, cost per dB, published figures, plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run ids or names ('latest' allowed); all runs when none given")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="md (default), csv, json, or html (a self-contained page)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of stdout (html defaults to ./report.html)")
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"),
                        help="where run directories live when the ledger's paths moved (default ./runs)")


def run(args: argparse.Namespace) -> int:
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


def main(args: argparse.Namespace) -> int:
    return run(args)
