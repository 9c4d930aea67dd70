"""`orchestrate estimate experiments.yaml [--explain] [--json]`: time and cost by phase."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_json_flag, estimate_table, load_and_plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="time and cost per job and phase, without starting anything",
                       description="Per job and in total: time and cost by phase (boot, setup, staging, "
                                   "train, eval, pull, teardown), each figure with its source.")
    p.add_argument("config", type=Path, help="experiments file (YAML)")
    p.add_argument("--explain", action="store_true", help="say where every figure comes from")
    add_json_flag(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    loaded = load_and_plan(args.config)
    if args.json:
        sys.stdout.write(json.dumps(loaded.estimate_json(), indent=2, default=str) + "\n")
        return 0
    estimate_table(loaded, title=f"estimate for {loaded.name} ({len(loaded.jobs)} jobs)",
                   explain=args.explain)
    return 0
