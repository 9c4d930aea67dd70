"""Gather what a report shows, read-only, from the ledger and the run directories.

The metrics files are the source of truth for quality: PSNR and SSIM are recomputed here as
the mean over the test frames of `metrics.csv` (PSNR per image, then averaged, the mip-NeRF
convention), not copied from a summary. Cost is recomputed from the ledger's billing
intervals of the job's instances. Nothing here writes anything.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import OrchestratorError
from ..ledger import JobRow, Ledger, parse_iso, utcnow
from ..secrets import redact

log = logging.getLogger(__name__)

COST_PER_DB_DEFINITION = (
    "cost per dB = the job's billed cost divided by its mean test PSNR in dB "
    "(lower is better; a job with no PSNR has none)")
BACKGROUND_NOTE = (
    "Background convention: the instant-ngp paper evaluates on black (--nerf_compatibility); "
    "most reimplementations composite on white, which lowers some scenes. Each job scores the "
    "same renders on both, and every published row is compared with ours under its own convention.")
REFERENCE_SCENES = ("mic", "ficus", "chair", "hotdog", "materials", "drums", "ship", "lego")


class ReportError(OrchestratorError):
    """The report cannot be made (unknown run, unreadable results)."""


@dataclass(frozen=True, slots=True)
class TrainPoint:
    step: int
    seconds: float
    loss: float | None
    psnr: float | None


@dataclass(frozen=True, slots=True)
class EstimateVsActual:
    estimate_seconds: float | None
    actual_seconds: float | None
    estimate_cost: float | None
    actual_cost: float | None
    estimate_phases_s: dict[str, float] = field(default_factory=dict)
    actual_phases_s: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def seconds_error_pct(self) -> float | None:
        return _error_pct(self.estimate_seconds, self.actual_seconds)

    @property
    def cost_error_pct(self) -> float | None:
        return _error_pct(self.estimate_cost, self.actual_cost)


@dataclass(frozen=True, slots=True)
class JobReport:
    run_id: str
    job_id: str
    experiment: str
    scene: str
    gpu: str
    backend: str
    host: str
    provider: str
    steps: int
    status: str
    psnr: float | None
    ssim: float | None
    n_frames: int
    train_seconds: float | None
    cost: float
    currency: str
    out_dir: Path | None
    estimate: EstimateVsActual
    psnr_black: float | None = None      # the same renders scored on black (metrics_black.csv)
    ssim_black: float | None = None
    train: str = ""                      # the experiment's `train:` options, "lr=0.005 ..."

    @property
    def cost_per_db(self) -> float | None:
        if self.psnr is None or self.psnr <= 0 or not math.isfinite(self.psnr):
            return None
        return self.cost / self.psnr

    def video(self, name: str = "compare") -> Path | None:
        if self.out_dir is None:
            return None
        p = self.out_dir / "videos" / f"{name}.mp4"
        return p if p.is_file() else None

    @property
    def train_log(self) -> Path | None:
        if self.out_dir is None:
            return None
        p = self.out_dir / "train_log.csv"
        return p if p.is_file() else None


@dataclass(frozen=True, slots=True)
class ReferenceRow:
    method: str
    budget: str
    gpu: str
    background: str
    psnr_by_scene: dict[str, float]
    average: float | None
    source: str


@dataclass(frozen=True, slots=True)
class ReportData:
    run_ids: tuple[str, ...]
    jobs: tuple[JobReport, ...]
    reference: tuple[ReferenceRow, ...]
    generated_at: str
    notes: tuple[str, ...] = ()          # why jobs did not succeed; budget decisions


NOTE_EVENT_KINDS = ("budget_refused", "budget_cap", "refused")


def _error_pct(estimate: float | None, actual: float | None) -> float | None:
    if estimate is None or actual is None or actual <= 0:
        return None
    return (estimate - actual) / actual * 100.0


def _float(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_metrics(path: Path) -> tuple[float | None, float | None, int]:
    """Mean PSNR and SSIM over the frames of a metrics.csv (frame, psnr, ssim)."""
    psnrs: list[float] = []
    ssims: list[float] = []
    try:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                p, s = _float(row.get("psnr")), _float(row.get("ssim"))
                if p is not None:
                    psnrs.append(p)
                if s is not None:
                    ssims.append(s)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _mean(psnrs), _mean(ssims), len(psnrs)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def read_train_log(path: Path) -> list[TrainPoint]:
    """Rows of train_log.csv (step, seconds, loss, psnr); blank PSNR cells become None."""
    out: list[TrainPoint] = []
    try:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                step, secs = _float(row.get("step")), _float(row.get("seconds"))
                if step is None or secs is None:
                    continue
                out.append(TrainPoint(int(step), secs, _float(row.get("loss")),
                                      _float(row.get("psnr"))))
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out


def read_reference() -> tuple[ReferenceRow, ...]:
    """Published NeRF-synthetic PSNR (paper and peers), with each row's source."""
    text = (Path(__file__).resolve().parent.parent / "catalog" / "reference_psnr.csv").read_text()
    rows = []
    for r in csv.DictReader(text.splitlines()):
        scenes = {s: v for s in REFERENCE_SCENES if (v := _float(r.get(s))) is not None}
        rows.append(ReferenceRow(r["method"], r["budget"], r["gpu"], r["background"], scenes,
                                 _float(r.get("average")), r["source"]))
    return tuple(rows)


def _estimate_parts(est: dict[str, Any] | None) -> tuple[float | None, float | None,
                                                          dict[str, float], str]:
    """Total seconds, total cost, per-phase seconds and source from a job's estimate JSON."""
    if not est:
        return None, None, {}, ""
    phases: dict[str, float] = {}
    raw = est.get("phases") or {}
    items = raw.items() if isinstance(raw, dict) else (
        (p.get("phase") or p.get("name"), p) for p in raw if isinstance(p, dict))
    for name, v in items:
        secs = _float(v.get("seconds", v.get("time_s", v.get("s")))) if isinstance(v, dict) else _float(v)
        if name and secs is not None:
            phases[str(name)] = secs
    seconds = next((f for k in ("total_seconds", "seconds", "total_s", "time_s")
                    if (f := _float(est.get(k))) is not None), None)
    if seconds is None and phases:
        seconds = sum(phases.values())
    cost = next((f for k in ("total_cost", "cost") if (f := _float(est.get(k))) is not None), None)
    source = est.get("source") or est.get("train_source") or ""
    if isinstance(source, dict):
        source = ", ".join(f"{k}: {v}" for k, v in source.items())
    return seconds, cost, phases, str(source)


def _find_out_dir(job: JobRow, result: dict[str, Any] | None, runs_root: Path | None) -> Path | None:
    candidates: list[Path] = []
    for d in (job.out_dir, (result or {}).get("out_dir")):
        if d:
            candidates += [Path(d), Path(d) / "out"]
    if runs_root is not None:
        base = runs_root / job.run_id / job.job_id
        candidates += [base, base / "out"]
    for c in candidates:
        if any((c / f).is_file() for f in ("metrics.csv", "summary.json", "train_log.csv")):
            return c                # train_log only: a job stopped early (budget, Ctrl-C)
    return None


def _job_cost(ledger: Ledger, job: JobRow, now: datetime) -> tuple[float, str, float | None]:
    """(billed cost, currency, billed wall seconds before rounding or None without instances).

    A job that shared an instance with others (a session) is charged its own seconds plus its
    share of the instance's shared time (`job_costs`), not the instance's whole bill: that is
    what its estimate predicts, and the jobs of one run then add up to the run's cost."""
    shares = [c for c in ledger.job_costs(job.run_id) if c["job_id"] == job.job_id]
    if shares:
        inst = ledger.instance(int(shares[0]["instance_row"]))
        return (sum(float(c["own_cost"]) + float(c["shared_cost"]) for c in shares),
                inst.currency if inst is not None else "",
                sum(float(c["own_seconds"]) + float(c["shared_seconds"]) for c in shares))
    rows = {r.row_id: r for r in ledger.instances(run_id=job.run_id) if r.job_id == job.job_id}
    if job.instance_row is not None and job.instance_row not in rows:
        inst = ledger.instance(job.instance_row)
        if inst is not None:
            rows[inst.row_id] = inst
    cost = sum(ledger.instance_cost(rid, now) for rid in rows)
    currency = next((r.currency for r in rows.values() if r.currency), "")
    seconds = 0.0
    for rid in rows:
        for b in ledger.billing(rid):
            if b.kind == "gpu":
                end = parse_iso(b.ended_at) if b.ended_at else now
                seconds += max(0.0, (end - parse_iso(b.started_at)).total_seconds())
    return cost, currency, seconds if rows else None


def _session_estimate(ledger: Ledger, job: JobRow, est_s: float | None) -> float | None:
    """The estimate to set beside a session job's charged seconds: its own time (the standalone
    estimate less boot, set-up, staging beyond set-up and teardown) plus an even share of what
    the plan expected the instance to pay once (the first job's boot, set-up and teardown), as
    `run.session.plan_instances` counts it. A job alone on its instance keeps its estimate."""
    shares = [c for c in ledger.job_costs(job.run_id) if c["job_id"] == job.job_id]
    if est_s is None or not job.estimate or len(shares) != 1:
        return est_s
    row = shares[0]["instance_row"]
    mates = {c["job_id"] for c in ledger.job_costs(job.run_id) if c["instance_row"] == row}
    if len(mates) < 2:
        return est_s
    from types import SimpleNamespace

    from ..run.session import own_seconds_of, shared_seconds_of

    rows = sorted((j for j in ledger.jobs(job.run_id) if j.job_id in mates and j.estimate),
                  key=lambda j: (j.started_at or "", j.job_id))
    if not rows:
        return est_s

    def plan(j: JobRow) -> Any:
        est = j.estimate or {}
        return SimpleNamespace(estimate=est, estimate_seconds=_estimate_parts(est)[0] or 0.0)

    return own_seconds_of(plan(job)) + shared_seconds_of(plan(rows[0])) / len(mates)


def _phase_wall_seconds(phases: list[dict[str, Any]]) -> float | None:
    """Wall time covered by the recorded phases (overlapping phases counted once)."""
    spans = sorted((parse_iso(p["started_at"]), parse_iso(p["ended_at"])) for p in phases
                   if p.get("started_at") and p.get("ended_at"))
    if not spans:
        return None
    total, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            total += (cur_e - cur_s).total_seconds()
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s).total_seconds()


def _job_report(ledger: Ledger, job: JobRow, result: dict[str, Any] | None,
                runs_root: Path | None, now: datetime) -> JobReport:
    out_dir = _find_out_dir(job, result, runs_root)
    summary: dict[str, Any] = {}
    if out_dir is not None and (out_dir / "summary.json").is_file():
        try:
            summary = json.loads((out_dir / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", out_dir / "summary.json", exc)
    elif result and result.get("summary"):
        summary = json.loads(result["summary"])
    psnr = ssim = None
    n_frames = 0
    if out_dir is not None and (out_dir / "metrics.csv").is_file():
        psnr, ssim, n_frames = read_metrics(out_dir / "metrics.csv")
    elif result:
        psnr, ssim = _float(result.get("psnr_mean")), _float(result.get("ssim_mean"))
        n_frames = int(result.get("n_test_images") or 0)
    psnr_black = ssim_black = None
    if out_dir is not None and (out_dir / "metrics_black.csv").is_file():
        psnr_black, ssim_black, _ = read_metrics(out_dir / "metrics_black.csv")
    elif isinstance((summary.get("backgrounds") or {}).get("black"), dict):
        black = summary["backgrounds"]["black"]
        psnr_black, ssim_black = _float(black.get("psnr_mean")), _float(black.get("ssim_mean"))
    train_s = _float(summary.get("train_seconds")) or _float((result or {}).get("train_seconds"))
    if train_s is None and out_dir is not None and (out_dir / "train_log.csv").is_file():
        points = read_train_log(out_dir / "train_log.csv")
        train_s = points[-1].seconds if points else None
    cost, currency, billed_s = _job_cost(ledger, job, now)
    est_s, est_cost, est_phases, source = _estimate_parts(job.estimate)
    standalone_s, est_s = est_s, _session_estimate(ledger, job, est_s)
    if est_cost is not None and standalone_s and est_s is not None:
        est_cost *= est_s / standalone_s            # the same share of the planned cost
    recorded = ledger.phases(job.run_id, job.job_id)
    actual_phases: dict[str, float] = {}
    for p in recorded:
        actual_phases[p["phase"]] = actual_phases.get(p["phase"], 0.0) + float(p["seconds"] or 0)
    # Actual time is what was billed (the estimate's total is billed wall time too); without
    # an instance, the wall time the recorded phases cover.
    actual_s = billed_s if billed_s is not None else _phase_wall_seconds(recorded)
    estimate = EstimateVsActual(est_s, actual_s, est_cost, cost if billed_s is not None else None,
                                est_phases, actual_phases, source)
    backend = str(summary.get("backend") or (result or {}).get("backend") or job.backend)
    tcnn = summary.get("tcnn")
    tcnn = tcnn if isinstance(tcnn, dict) else {}
    if tcnn.get("state") in ("built", "cached", "failed"):   # tiny-cuda-nn's fate on that host
        backend += f" (tcnn {tcnn['state']})"
    return JobReport(job.run_id, job.job_id, job.experiment, job.scene, job.gpu, backend,
                     job.host_name, job.provider, int(summary.get("steps") or job.steps or 0),
                     job.status, psnr, ssim, n_frames, train_s, cost,
                     currency or str((job.estimate or {}).get("currency") or ""), out_dir, estimate,
                     psnr_black=psnr_black, ssim_black=ssim_black,
                     train=_train_text((job.settings or {}).get("train") or summary.get("train_options")))


def _train_text(options: Any) -> str:
    """`train:` options as a table cell: `key=value` pairs in key order."""
    if not isinstance(options, dict):
        return ""
    return " ".join(f"{k}={v}" for k, v in sorted(options.items()))


def resolve_runs(ledger: Ledger, wanted: list[str] | None) -> tuple[str, ...]:
    """Run ids for the names or ids the user gave ("latest" and run names allowed); all if none."""
    runs = ledger.runs()
    if not wanted:
        return tuple(r["run_id"] for r in runs)
    out: list[str] = []
    for w in wanted:
        if w == "latest" and runs:
            hits = [runs[-1]["run_id"]]
        else:
            hits = [r["run_id"] for r in runs if r["run_id"] == w] or \
                   [r["run_id"] for r in runs if r["name"] == w][-1:] or \
                   [r["run_id"] for r in runs if r["run_id"].startswith(w)]
        if not hits:
            known = ", ".join(r["run_id"] for r in runs[-5:]) or "none yet"
            raise ReportError(f"unknown run {w!r}",
                              hint=f"give a run id or name from `orchestrate status` (recent: {known})")
        out += [h for h in hits if h not in out]
    return tuple(out)


def collect(ledger: Ledger, runs: list[str] | None = None, *, runs_root: Path | None = None,
            now: datetime | None = None) -> ReportData:
    """Everything the report shows for the given runs (all runs when none given)."""
    now = now or utcnow()
    run_ids = resolve_runs(ledger, runs)
    results = {(r["run_id"], r["job_id"]): r for r in ledger.results(list(run_ids))} if run_ids else {}
    jobs = [j for rid in run_ids for j in ledger.jobs(rid)]
    reports = [_job_report(ledger, j, results.get((j.run_id, j.job_id)), runs_root, now)
               for j in jobs]
    reports.sort(key=lambda r: (r.scene, r.gpu, r.backend, r.run_id, r.job_id))
    notes = [f"{j.run_id} {j.job_id}: {j.status}: {redact(j.error)}" for j in jobs
             if j.status != "succeeded" and j.error]
    for rid in run_ids:
        try:
            events = ledger.events(rid)
        except sqlite3.DatabaseError as exc:   # notes are extras: a damaged page must not cost the report
            log.warning("the ledger's events of run %s cannot be read (%s); the report leaves them out",
                        rid, exc)
            notes.append(f"{rid}: events left out: the ledger's events table is damaged ({exc})")
            continue
        notes += [f"{e['run_id']} {e['job_id'] or ''} {e['kind']}: {redact(e['message'])}".replace("  ", " ")
                  for e in events if e["kind"] in NOTE_EVENT_KINDS]
    return ReportData(run_ids, tuple(reports), read_reference(), now.isoformat(timespec="seconds"),
                      tuple(notes))
