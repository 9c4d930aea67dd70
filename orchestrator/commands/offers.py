"""`orchestrate offers [FILE] [--gpu G] [--provider P] [--json]`: live offers of the configured
cloud providers (those whose keys are set), ranked by what the file's jobs would cost on each,
not by $/h.

Predicted seconds on an offer = boot + environment + each job's own time (train, eval, pull:
the estimate's figures, from the catalog or this user's history) + teardown, all on one
instance as a session runs them. The boot depends on the offer's download bandwidth where the
API reports it (vast `inet_down`): the image comes down at that speed; otherwise the catalog's
boot. So a cheap offer on a slow line can lose to a dearer one for a short sweep and win for
a long one.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OrchestratorError
from ..secrets import redact

CLOUD = ("vastai", "runpod", "lambda")
# assumption: a CUDA + PyTorch image of ~8 GB, pulled at the offer's download speed, plus the
# container start; used only where the offer reports its bandwidth
IMAGE_MB = 8000.0
BOOT_FIXED_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offers", help="live offers ranked by the predicted cost of your jobs",
                       description="Live offers of the configured cloud providers (keys set), ranked by "
                                   "the predicted cost of the file's jobs on each (boot, environment, "
                                   "data, training), with reliability where the provider reports it.")
    p.add_argument("config", type=Path, nargs="?", default=Path("experiments.yaml"),
                   help="experiments file (default experiments.yaml)")
    p.add_argument("--gpu", default=None, help="only this GPU")
    p.add_argument("--provider", default=None, choices=CLOUD, help="only this provider")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)


@dataclass(frozen=True, slots=True)
class RankedOffer:
    host: str
    provider: str
    offer_id: str | None
    gpu: str
    price_per_hour: float
    currency: str
    reliability: float | None
    inet_down_mbps: float | None
    boot_s: float
    total_s: float
    cost: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _phase_s(est: dict[str, Any], name: str) -> float:
    v = (est.get("phases") or {}).get(name) or {}
    return float(v.get("seconds") or 0.0) if isinstance(v, dict) else float(v or 0.0)


def predicted(offer: Any, jobs: list[Any]) -> tuple[float, float]:
    """(boot seconds, total seconds) of `jobs` run one after another on one instance of `offer`."""
    est = jobs[0].estimate or {}
    boot = _phase_s(est, "boot")
    if offer.inet_down_mbps:
        boot = BOOT_FIXED_S + IMAGE_MB * 8.0 / float(offer.inet_down_mbps)
    shared = boot + max(_phase_s(est, "setup"), _phase_s(est, "staging")) + _phase_s(est, "teardown")
    own = sum(_phase_s(j.estimate or {}, p) for j in jobs for p in ("train", "eval", "pull"))
    return boot, shared + own


def rank(loaded: Any, *, gpu: str | None = None, provider: str | None = None,
         make: Any = None) -> tuple[list[RankedOffer], list[str]]:
    from ..config import check_secrets
    from ..providers import make_provider
    make = make or make_provider
    notes: list[str] = []
    out: list[RankedOffer] = []
    hosts = {j.host_name: j.host for j in loaded.jobs if j.host.provider in CLOUD}
    for name, host in sorted(hosts.items()):
        if provider and host.provider != provider or gpu and (host.gpu or "").lower() != gpu.lower():
            continue
        try:
            check_secrets(loaded.config, [name])
        except ConfigError as exc:
            notes.append(f"{name}: skipped, {exc.message.split(': ', 1)[-1]}")
            continue
        jobs = [j for j in loaded.jobs if j.host_name == name]
        try:
            offers = make(host).offers(host.gpu or "")
        except OrchestratorError as exc:
            notes.append(f"{name}: offers not available: {redact(str(exc)).splitlines()[0]}")
            continue
        for o in offers:
            if not o.available:
                continue
            boot, total = predicted(o, jobs)
            out.append(RankedOffer(name, o.provider, o.offer_id, o.gpu, o.price_per_hour, o.currency,
                                   o.reliability, o.inet_down_mbps, boot, total,
                                   o.price_per_hour * total / 3600.0))
    out.sort(key=lambda r: (r.currency, r.cost))
    return out, notes


def main(args: argparse.Namespace) -> int:
    from . import load_and_plan, money
    loaded = load_and_plan(args.config, require_secrets=False)
    ranked, notes = rank(loaded, gpu=args.gpu, provider=args.provider)
    if args.json:
        sys.stdout.write(json.dumps({"offers": [r.as_dict() for r in ranked], "notes": notes}, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console(width=max(110, Console().width))
    t = Table(title=f"offers for {loaded.name} ({len(loaded.jobs)} jobs), cheapest for these jobs first",
              title_justify="left")
    for col in ("#", "host", "provider", "offer", "gpu", "$/h", "reliability", "down Mbps", "boot", "total",
                "predicted cost"):
        t.add_column(col, justify="right" if col in ("#", "$/h", "reliability", "down Mbps", "boot", "total",
                                                     "predicted cost") else "left")
    for i, r in enumerate(ranked, 1):
        t.add_row(str(i), r.host, r.provider, r.offer_id or "-", r.gpu, money(r.price_per_hour),
                  "-" if r.reliability is None else f"{100 * r.reliability:.1f} %",
                  "-" if r.inet_down_mbps is None else f"{r.inet_down_mbps:.0f}",
                  f"{r.boot_s / 60:.1f} min", f"{r.total_s / 60:.1f} min", f"{money(r.cost)} {r.currency}")
    console.print(t)
    for n in notes:
        console.print(n)
    return 0
