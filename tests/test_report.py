"""`orchestrate report` over synthetic runs: real ledger rows, real run directories.

Every expected number here is recomputed directly from the files the test wrote (csv module,
statistics) and from the billing rule (duration rounded up to the granularity × price), not
taken from the report's own code.
"""
from __future__ import annotations

import csv
import json
import math
import random
import statistics
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.report import BACKGROUND_NOTE, COST_PER_DB_DEFINITION, ReportError, collect, render, write_report
from orchestrator.report.synthetic import FakeJob, add_finished_job

T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()


def _metrics_mean(path: Path) -> tuple[float, float]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return (statistics.fmean(float(r["psnr"]) for r in rows),
            statistics.fmean(float(r["ssim"]) for r in rows))


def _billed_cost(seconds: float, granularity_s: float, price_per_hour: float) -> float:
    return math.ceil(seconds / granularity_s) * granularity_s * price_per_hour / 3600


@pytest.fixture()
def world(tmp_path):
    """Two runs, four jobs, different GPUs/backends/prices/frame counts."""
    rng = random.Random(7)
    led = Ledger.open(tmp_path / "home")
    runs_root = tmp_path / "runs"
    specs = [
        ("r1", FakeJob("ngp-lego-h100", "lego", gpu="H100", backend="tcnn", price_per_hour=2.13,
                       granularity_s=60, billed_s=125, video=False,
                       estimate={"total_seconds": 40.0, "total_cost": 0.05,
                                 "phases": {"boot": 5, "train": 30, "eval": 5}})),
        ("r1", FakeJob("ngp-chair-4090", "chair", gpu="RTX 4090", backend="torch",
                       price_per_hour=0.44, granularity_s=1, billed_s=301, video=False)),
        ("r2", FakeJob("ngp-lego-4090", "lego", gpu="RTX 4090", backend="torch",
                       price_per_hour=0.44, granularity_s=1, billed_s=200, video=False)),
        ("r2", FakeJob("ngp-default-here", "default", gpu="cpu", backend="torch",
                       price_per_hour=0.0, billed_s=50, video=False)),
    ]
    jobs = []
    for i, (run, spec) in enumerate(specs):
        n = 3 + i
        spec = FakeJob(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                          "psnrs": tuple(rng.uniform(18, 36) for _ in range(n)),
                          "ssims": tuple(rng.uniform(0.6, 0.99) for _ in range(n))})
        if led.run(run) is None:
            led.create_run(run, f"name-{run}", budget=5.0)
        out = add_finished_job(led, run, spec, runs_root=runs_root, start_epoch=T0 + 1000 * i)
        jobs.append((run, spec, out))
    yield led, runs_root, jobs
    led.close()


def test_report_numbers_equal_a_direct_recomputation_from_the_metrics_files(world):
    led, runs_root, jobs = world
    data = json.loads(write_report(led, None, "json", runs_root=runs_root))
    by_job = {j["job"]: j for j in data["jobs"]}
    assert set(by_job) == {spec.job_id for _, spec, _ in jobs}
    psnrs, costs = [], []
    for run, spec, out in jobs:
        psnr, ssim = _metrics_mean(out / "metrics.csv")
        cost = _billed_cost(spec.billed_s, spec.granularity_s, spec.price_per_hour)
        row = by_job[spec.job_id]
        assert row["run"] == run and row["scene"] == spec.scene and row["gpu"] == spec.gpu
        assert row["backend"] == spec.backend
        assert row["psnr"] == pytest.approx(psnr, abs=1e-9)
        assert row["ssim"] == pytest.approx(ssim, abs=1e-9)
        assert row["cost"] == pytest.approx(cost, abs=1e-9)
        assert row["train_s"] == pytest.approx(spec.train_seconds)
        assert row["cost_per_db"] == pytest.approx(cost / psnr)
        psnrs.append(psnr)
        costs.append(cost)
    assert data["mean"]["psnr"] == pytest.approx(statistics.fmean(psnrs))
    assert data["mean"]["cost"] == pytest.approx(statistics.fmean(costs))
    assert data["definitions"]["cost_per_db"] == COST_PER_DB_DEFINITION
    # The pivot is the mean PSNR per scene and GPU/backend.
    lego_4090 = [_metrics_mean(o / "metrics.csv")[0] for _, s, o in jobs
                 if s.scene == "lego" and s.gpu == "RTX 4090"]
    assert data["psnr_pivot"]["lego"]["RTX 4090 / torch"] == pytest.approx(statistics.fmean(lego_4090))


def test_markdown_and_csv_show_the_same_rounded_numbers(world):
    led, runs_root, jobs = world
    md = write_report(led, ["r1"], "md", runs_root=runs_root)
    text = write_report(led, ["r1"], "csv", runs_root=runs_root)
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["job"] for r in rows][-1] == "2 jobs" and rows[-1]["run"] == "mean"
    for run, spec, out in jobs:
        psnr, ssim = _metrics_mean(out / "metrics.csv")
        if run != "r1":
            assert spec.job_id not in md
            continue
        line = next(ln for ln in md.splitlines() if f"| {spec.job_id} |" in ln)
        assert f"| {psnr:.2f} | {ssim:.4f} |" in line
        row = next(r for r in rows if r["job"] == spec.job_id)
        assert float(row["psnr"]) == pytest.approx(psnr, rel=1e-5)
    assert COST_PER_DB_DEFINITION in md and BACKGROUND_NOTE in md


def test_published_figures_sit_beside_ours_with_the_background_convention(world):
    led, runs_root, jobs = world
    data = json.loads(write_report(led, None, "json", runs_root=runs_root))
    ref = {r["method"]: r for r in data["reference"]}
    paper = ref["instant-ngp hash (paper Table 2)"]
    assert paper["lego"] == 36.39 and paper["background"].startswith("black")
    assert "nerfbaselines" in paper["source"]
    ours = ref["ours (RTX 4090, torch)"]
    lego = [_metrics_mean(o / "metrics.csv")[0] for _, s, o in jobs
            if s.scene == "lego" and s.gpu == "RTX 4090"]
    assert ours["background"] == "white" and ours["lego"] == pytest.approx(statistics.fmean(lego))
    assert ours["mic"] is None
    assert "black" in data["definitions"]["background"] and "white" in data["definitions"]["background"]


def test_estimate_vs_actual_per_job(world):
    led, runs_root, jobs = world
    data = json.loads(write_report(led, ["r1"], "json", runs_root=runs_root))
    est = {e["job"]: e for e in data["estimate_vs_actual"]}
    h100 = next(s for _, s, _ in jobs if s.job_id == "ngp-lego-h100")
    actual_s = h100.billed_s                              # billed wall time, unrounded
    actual_cost = _billed_cost(125, 60, 2.13)
    row = est["ngp-lego-h100"]
    assert row["estimate_s"] == 40.0 and row["actual_s"] == pytest.approx(actual_s)
    assert row["seconds_error_pct"] == pytest.approx((40.0 - actual_s) / actual_s * 100)
    assert row["cost_error_pct"] == pytest.approx((0.05 - actual_cost) / actual_cost * 100)
    assert est["ngp-chair-4090"]["estimate_s"] is None      # no estimate recorded: blank, not 0
    assert row["phases_s"]["train"] == {"estimate": 30, "actual": h100.phases_s["train"]}
    assert row["phases_s"]["teardown"] == {"estimate": None, "actual": h100.phases_s["teardown"]}


def test_runs_are_chosen_by_id_name_or_latest_and_unknown_runs_fail_clearly(world):
    led, runs_root, _ = world
    assert collect(led, ["r2"], runs_root=runs_root).run_ids == ("r2",)
    assert collect(led, ["name-r1"], runs_root=runs_root).run_ids == ("r1",)
    assert collect(led, ["latest"], runs_root=runs_root).run_ids == ("r2",)
    with pytest.raises(ReportError) as exc:
        collect(led, ["nope"])
    assert "unknown run 'nope'" in str(exc.value) and "r1" in exc.value.hint
    with pytest.raises(ReportError):
        render(collect(led, None), "pdf")


def test_mixed_currencies_are_never_averaged(tmp_path):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    add_finished_job(led, "r", FakeJob("a", "lego", currency="USD", video=False),
                     runs_root=tmp_path / "runs", start_epoch=T0)
    add_finished_job(led, "r", FakeJob("b", "lego", currency="CNY", price_per_hour=15, video=False),
                     runs_root=tmp_path / "runs", start_epoch=T0)
    data = json.loads(write_report(led, None, "json"))
    assert data["mean"]["cost"] is None and data["mean"]["psnr"] == pytest.approx(21.0)
    assert {j["currency"] for j in data["jobs"]} == {"USD", "CNY"}


def test_metrics_fall_back_to_the_ledger_when_the_run_dir_is_gone(tmp_path):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    out = add_finished_job(led, "r", FakeJob("a", "lego", psnrs=(25.0, 27.0), video=False),
                           runs_root=tmp_path / "runs", start_epoch=T0)
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    (row,) = json.loads(write_report(led, None, "json"))["jobs"]
    assert row["psnr"] == pytest.approx(26.0) and row["status"] == "succeeded"


def test_html_is_self_contained_with_plots_and_playable_video_sources(tmp_path):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    out = add_finished_job(led, "r", FakeJob("a", "lego"), runs_root=tmp_path / "runs",
                           start_epoch=T0)
    page = tmp_path / "site" / "report.html"
    html = write_report(led, None, "html", page, embed_video_max_bytes=0)
    assert page.read_text() == html
    assert "<style>" in html and '<link' not in html and html.count("<svg") == 2
    assert 'src="../runs/r/a/videos/compare.mp4"' in html
    assert (page.parent / "../runs/r/a/videos/compare.mp4").resolve() == (out / "videos/compare.mp4").resolve()
    small = write_report(led, None, "html", None)          # default: small videos are embedded
    assert 'src="data:video/mp4;base64,' in small
    empty = Ledger.open(tmp_path / "empty")
    assert "No jobs in the ledger" in write_report(empty, None, "html")


def test_without_an_instance_actual_time_is_the_wall_time_the_phases_cover(tmp_path):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    led.add_job("r", "j", experiment="e", scene="lego", host_name="h", provider="local", gpu="cpu",
                steps=10, backend="torch", dataset="d",
                estimate={"total_seconds": 30.0, "phases": [{"phase": "setup", "seconds": 10.0}]})
    led.record_phase("r", "j", "setup", T0, T0 + 10)       # set-up and staging overlap
    led.record_phase("r", "j", "staging", T0 + 2, T0 + 12)
    led.record_phase("r", "j", "train", T0 + 20, T0 + 30)   # a gap is not counted
    (row,) = json.loads(write_report(led, None, "json"))["estimate_vs_actual"]
    assert row["actual_s"] == pytest.approx(22.0) and row["actual_cost"] is None
    assert row["seconds_error_pct"] == pytest.approx((30 - 22) / 22 * 100)
    assert row["phases_s"]["setup"] == {"estimate": 10.0, "actual": 10.0}


def test_notes_say_why_jobs_did_not_succeed_and_never_show_secrets(tmp_path):
    import sqlite3

    from orchestrator.secrets import remember

    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r", budget=1.0)
    add_finished_job(led, "r", FakeJob("ok", "lego", video=False), runs_root=tmp_path / "runs",
                     start_epoch=T0)
    led.add_job("r", "late", experiment="e", scene="lego", host_name="h", provider="local",
                gpu="cpu", steps=10, backend="torch", dataset="d")
    led.update_job("r", "late", status="budget_stopped", error="not started: it would cross the budget")
    led.add_event("budget_refused", "late not started: spent 0.9 + 0 + its estimate 0.2 > cap 1.0",
                  "r", "late")
    secret = "tok-9f8e7d6c5b4a"
    with sqlite3.connect(led.path) as raw:           # a row written before the secret was known
        raw.execute("INSERT INTO events (at, run_id, job_id, kind, message) VALUES (?,?,?,?,?)",
                    ("2026-03-01T10:00:00+00:00", "r", None, "budget_cap", f"cap hit; key {secret}"))
    remember(secret)
    md = write_report(led, None, "md")
    data = json.loads(write_report(led, None, "json"))
    html = write_report(led, None, "html")
    assert "r late: budget_stopped: not started: it would cross the budget" in data["notes"]
    assert any("budget_refused: late not started" in n for n in data["notes"])
    assert "## Notes" in md and '<ul id="notes">' in html
    for text in (md, json.dumps(data), html):
        assert secret not in text and "cap hit; key ***" in text
    late = next(j for j in data["jobs"] if j["job"] == "late")
    assert late["psnr"] is None and late["status"] == "budget_stopped"


def test_a_job_stopped_early_shows_its_training_time_and_curve_without_metrics(tmp_path):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    out = add_finished_job(led, "r", FakeJob("stopped", "lego", status="budget_stopped",
                                             train_seconds=7.5, video=False),
                           runs_root=tmp_path / "runs", start_epoch=T0)
    (out / "metrics.csv").unlink()
    (out / "summary.json").unlink()
    import sqlite3
    with sqlite3.connect(led.path) as raw:                  # nothing was evaluated: no result row
        raw.execute("DELETE FROM results")
    data = collect(led, None)
    (job,) = data.jobs
    assert job.out_dir == out and job.psnr is None and job.train_seconds == pytest.approx(7.5)
    html = render(data, "html")
    assert 'id="plot-training"' in html and 'id="plot-psnr-cost"' not in html


def test_each_published_row_is_compared_under_its_own_background(world):
    led, runs_root, jobs = world
    _, spec, out = next(j for j in jobs if j[1].job_id == "ngp-lego-h100")
    # the payload's second convention: the same renders scored on black
    black = [p + 1.5 for p in spec.psnrs]
    with (out / "metrics_black.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "psnr", "ssim"])
        for i, (p, s) in enumerate(zip(black, spec.ssims)):
            w.writerow([f"r_{i}", f"{p:.6f}", f"{s:.6f}"])
    data = json.loads(write_report(led, ["r1"], "json", runs_root=runs_root))
    ref = {r["method"]: r for r in data["reference"]}
    ours_black = ref["ours (H100, tcnn), on black"]
    assert ours_black["background"] == "black" and ours_black["lego"] == pytest.approx(statistics.fmean(black))
    assert ref["ours (H100, tcnn)"]["background"] == "white"
    white = _metrics_mean(out / "metrics.csv")[0]
    cost = _billed_cost(spec.billed_s, spec.granularity_s, spec.price_per_hour)
    lines = [x for x in data["comparison"] if x.startswith("lego (H100, tcnn)")]
    paper = next(x for x in lines if "paper Table 2" in x)       # published on black → ours on black
    assert f"{statistics.fmean(black) - 36.39:+.2f} dB vs instant-ngp hash (paper Table 2) [black]" in paper
    nerfacc = next(x for x in lines if "nerfacc occupancy grid" in x)   # published on white → ours on white
    assert f"{white - 35.67:+.2f} dB vs nerfacc occupancy grid [white]" in nerfacc
    assert paper.endswith(f"at {cost:.4g} USD")
    md = write_report(led, ["r1"], "md", runs_root=runs_root)
    assert f"- {paper}" in md


def test_train_options_are_a_column_of_the_results(tmp_path):
    """Jobs that differ only in their `train:` options are told apart in every format."""
    led = Ledger.open(tmp_path / "home")
    led.create_run("r", "r")
    add_finished_job(led, "r", FakeJob("a", "lego", video=False, train={"lr": 0.01, "log2_hashmap_size": 14}),
                     runs_root=tmp_path / "runs", start_epoch=T0)
    add_finished_job(led, "r", FakeJob("b", "lego", video=False, train={"lr": 0.005, "log2_hashmap_size": 14}),
                     runs_root=tmp_path / "runs", start_epoch=T0)
    add_finished_job(led, "r", FakeJob("c", "lego", video=False), runs_root=tmp_path / "runs", start_epoch=T0)
    data = json.loads(write_report(led, None, "json"))
    assert {j["job"]: j["train"] for j in data["jobs"]} == {
        "a": "log2_hashmap_size=14 lr=0.01", "b": "log2_hashmap_size=14 lr=0.005", "c": ""}
    md = write_report(led, None, "md").splitlines()
    header = next(line for line in md if line.startswith("| run | job |"))
    assert "| steps | train | status |" in header
    assert any("| b | lego |" in line and "| log2_hashmap_size=14 lr=0.005 |" in line for line in md)
