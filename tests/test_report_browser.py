"""The HTML report in a real headless browser (Debian's chromium).

The page is served over a loopback HTTP server; chromium loads it, lets the page's own script
mark each <video> loaded or failed (data-state), and dumps the DOM. We check the results
table against numbers recomputed from the metrics files, that every video decoded (one
embedded as a data: URI, one by relative path), and write a screenshot for the reviewer
(into $ORCHESTRATE_ARTIFACTS when set, else the test's tmp dir).
"""
from __future__ import annotations

import csv
import functools
import os
import shutil
import statistics
import subprocess
import threading
from datetime import datetime, timezone
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.report import write_report
from orchestrator.report.synthetic import FakeJob, add_finished_job

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()


class _Dom(HTMLParser):
    """Cells of #results (per row: data-job → {col: (data-value, text)}) and <video> attrs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, tuple[str | None, str]]] = {}
        self.videos: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._row: str | None = None
        self._cell: tuple[str, str | None] | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "results" and a.get("data-job"):
            self._row = a["data-job"]
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None:
            self._cell, self._text = (a.get("data-col", ""), a.get("data-value")), ""
        elif tag == "video":
            self.videos.append(a)

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            col, value = self._cell
            self.rows[self._row][col] = (value, self._text)
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None


def _chromium(url: str, user_dir: Path, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={user_dir}", "--virtual-time-budget=8000",
           *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture()
def served(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None       # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
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

    dom = _Dom()
    dom.feed(_chromium(f"{served}/site/report.html", tmp_path / "chrome", "--dump-dom"))

    # The table is there, with the numbers recomputed from the metrics files.
    assert set(dom.rows) == {"ngp-lego-h100", "ngp-chair-cpu", "2 jobs"}
    psnrs = []
    for job, out in zip(jobs, outs):
        with (out / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        psnr = statistics.fmean(float(r["psnr"]) for r in rows)
        ssim = statistics.fmean(float(r["ssim"]) for r in rows)
        psnrs.append(psnr)
        cells = dom.rows[job.job_id]
        assert float(cells["psnr"][0]) == pytest.approx(psnr) and cells["psnr"][1] == f"{psnr:.2f}"
        assert float(cells["ssim"][0]) == pytest.approx(ssim) and cells["ssim"][1] == f"{ssim:.4f}"
        assert cells["gpu"][1] == job.gpu and cells["backend"][1] == job.backend
        cost = 60 * job.price_per_hour / 3600                 # 60 s billed at 1 s granularity
        assert float(cells["cost"][0]) == pytest.approx(cost)
        assert float(cells["cost_per_db"][0]) == pytest.approx(cost / psnr)
    mean = dom.rows["2 jobs"]
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
    broken = _Dom()
    broken.feed(_chromium(f"{served}/site/report.html", tmp_path / "chrome", "--dump-dom"))
    states = {v["data-job"]: v.get("data-state") for v in broken.videos}
    assert states == {"ngp-lego-h100": "loaded", "ngp-chair-cpu": "error"}
    (tmp_path / "moved.mp4").rename(outs[1] / "videos" / "compare.mp4")

    # A screenshot for the reviewer.
    shot_dir = Path(os.environ.get("ORCHESTRATE_ARTIFACTS") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "report_screenshot.png"
    _chromium(f"{served}/site/report.html", tmp_path / "chrome", "--window-size=1280,2200",
              "--hide-scrollbars", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
