"""The HTML report in a real headless browser (Debian's chromium).

The page is served over a loopback HTTP server; chromium loads it, lets the page's own script
mark each <video> loaded or failed (data-state), and dumps the DOM. We check the results
table against numbers recomputed from the metrics files, that every video decoded (one
embedded as a data: URI, one by relative path), and write a screenshot for the reviewer
(into $ORCHESTRATE_ARTIFACTS when set, else the test's tmp dir).
"""
from __future__ import annotations

import csv
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.report import write_report
from orchestrator.report.browser import ReportDom, chromium, chromium_path, serve_dir
from orchestrator.report.synthetic import FakeJob, add_finished_job

pytestmark = pytest.mark.browser

T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()


@pytest.fixture()
def served(tmp_path):
    with serve_dir(tmp_path) as url:
        yield url


@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed")
def test_html_report_in_headless_chromium(tmp_path, served):
    led = Ledger.open(tmp_path / "home")
    led.create_run("r1", "browser-demo")
    jobs = [FakeJob("ngp-lego-h100", "lego", gpu="H100", backend="tcnn", price_per_hour=2.13,
                    psnrs=(31.25, 29.5, 33.125), ssims=(0.95, 0.93, 0.97), video_seconds=1.0,
                    estimate={"total_seconds": 20.0, "total_cost": 0.02}),
            FakeJob("ngp-chair-cpu", "chair", gpu="cpu", backend="torch", price_per_hour=0.1,
                    psnrs=(21.0, 23.5), ssims=(0.81, 0.84), video_seconds=4.0)]
    outs = [add_finished_job(led, "r1", j, runs_root=tmp_path / "runs", start_epoch=T0)
            for j in jobs]
    small = (outs[0] / "videos" / "compare.mp4").stat().st_size
    assert (outs[1] / "videos" / "compare.mp4").stat().st_size > small
    page = tmp_path / "site" / "report.html"
    write_report(led, None, "html", page, embed_video_max_bytes=small)   # one embedded, one by path

    dom = ReportDom(chromium(f"{served}/site/report.html", tmp_path / "chrome", "--dump-dom"))

    # The table is there, with the numbers recomputed from the metrics files.
    assert set(dom.rows) == {("r1", "ngp-lego-h100"), ("r1", "ngp-chair-cpu"), ("mean", "2 jobs")}
    psnrs = []
    for job, out in zip(jobs, outs):
        with (out / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        psnr = statistics.fmean(float(r["psnr"]) for r in rows)
        ssim = statistics.fmean(float(r["ssim"]) for r in rows)
        psnrs.append(psnr)
        cells = dom.rows[("r1", job.job_id)]
        assert float(cells["psnr"][0]) == pytest.approx(psnr) and cells["psnr"][1] == f"{psnr:.2f}"
        assert float(cells["ssim"][0]) == pytest.approx(ssim) and cells["ssim"][1] == f"{ssim:.4f}"
        assert cells["gpu"][1] == job.gpu and cells["backend"][1] == job.backend
        cost = 60 * job.price_per_hour / 3600                 # 60 s billed at 1 s granularity
        assert float(cells["cost"][0]) == pytest.approx(cost)
        assert float(cells["cost_per_db"][0]) == pytest.approx(cost / psnr)
    mean = dom.rows[("mean", "2 jobs")]
    assert mean["run"][1] == "mean" and float(mean["psnr"][0]) == pytest.approx(statistics.fmean(psnrs))

    # Every video element loaded its file (the page's script sets data-state on loadeddata).
    assert len(dom.videos) == 2
    srcs = {v["data-job"]: v["src"] for v in dom.videos}
    assert srcs["ngp-lego-h100"].startswith("data:video/mp4;base64,")
    assert srcs["ngp-chair-cpu"] == "../runs/r1/ngp-chair-cpu/videos/compare.mp4"
    for v in dom.videos:
        assert v.get("data-state") == "loaded", f"video for {v['data-job']} did not load: {v}"
    durations = {v["data-job"]: float(v["data-duration"]) for v in dom.videos}
    assert durations["ngp-lego-h100"] == pytest.approx(1.0, abs=0.15)
    assert durations["ngp-chair-cpu"] == pytest.approx(4.0, abs=0.15)

    # A missing file is reported as such, not silently shown as a black box.
    (outs[1] / "videos" / "compare.mp4").rename(tmp_path / "moved.mp4")
    # (a profile of its own: the first one's disk cache may still hold the video)
    broken = ReportDom(chromium(f"{served}/site/report.html", tmp_path / "chrome-2", "--dump-dom"))
    states = {v["data-job"]: v.get("data-state") for v in broken.videos}
    assert states == {"ngp-lego-h100": "loaded", "ngp-chair-cpu": "error"}
    (tmp_path / "moved.mp4").rename(outs[1] / "videos" / "compare.mp4")

    # A screenshot for the reviewer.
    shot_dir = Path(os.environ.get("ORCHESTRATE_ARTIFACTS") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "report_screenshot.png"
    chromium(f"{served}/site/report.html", tmp_path / "chrome", "--window-size=1280,2200",
              "--hide-scrollbars", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
