"""The self-contained HTML report: tables, inline SVG plots, inline comparison videos.

One file with inline CSS and inline SVG (matplotlib, Agg backend, imported lazily). A job's
`videos/compare.mp4` is embedded as a data: URI when it is small, otherwise referenced by a
path relative to the HTML file, so the page works next to the run directories. A few lines
of inline script mark each <video> with `data-state="loaded|error"` (and its duration) once
the browser has tried it, and say so under the video when it cannot be played.
"""
from __future__ import annotations

import base64
import io
import math
import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collect import BACKGROUND_NOTE, COST_PER_DB_DEFINITION, JobReport, ReportData, read_train_log
from .tables import ESTIMATE_NOTE, comparison_lines, estimate_frame, fmt, psnr_pivot, reference_frame, results_frame

if TYPE_CHECKING:
    import pandas as pd

EMBED_VIDEO_MAX_BYTES = 1_000_000

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde;
padding-bottom:4px}
p.note{color:#4a5468;margin:4px 0}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dce6;padding:3px 8px}th{background:#eef1f7;text-align:left}
td.num{text-align:right}tr.mean td{font-weight:600;background:#f6f8fb}
tr.ours td{background:#f1f8ef}
td[data-col=source]{font-size:11px;color:#4a5468}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{margin:0}
.videos{display:flex;flex-wrap:wrap;gap:16px}.videos figure{margin:0;max-width:380px}
video{width:100%;background:#000;image-rendering:pixelated}
figcaption{font-size:12px;color:#4a5468}.err{color:#b00020}
"""

SCRIPT = """
document.querySelectorAll('video[data-job]').forEach(function (v) {
  function mark(state) {
    v.dataset.state = state;
    if (state === 'loaded') { v.dataset.duration = String(v.duration); }
    var msg = v.parentElement.querySelector('.err');
    if (state === 'error' && msg) { msg.textContent = 'this video could not be loaded: ' +
                                    v.getAttribute('data-file'); }
  }
  if (v.readyState >= 2) { mark('loaded'); }
  v.addEventListener('loadeddata', function () { mark('loaded'); });
  v.addEventListener('error', function () { mark('error'); }, true);
});
"""


def _table(df: pd.DataFrame, table_id: str, *, index: bool = False,
           row_class: Any = None) -> str:
    if index:
        df = df.reset_index()
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cls = row_class(row) if row_class else ""
        attrs = f' class="{cls}"' if cls else ""
        if "job" in df.columns:
            attrs += f' data-job="{escape(str(row["job"]))}" data-run="{escape(str(row.get("run", "")))}"'
        cells = []
        for c in df.columns:
            v = row[c]
            if isinstance(v, float):
                val = "" if math.isnan(v) else repr(float(v))
                cells.append(f'<td class="num" data-col="{escape(str(c))}" data-value="{val}">'
                             f"{escape(fmt(v, str(c)))}</td>")
            else:
                cells.append(f'<td data-col="{escape(str(c))}">{escape(fmt(v, str(c)))}</td>')
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.find("<svg"):]


def plot_psnr_vs_cost(data: ReportData) -> str | None:
    """Scatter of PSNR against cost, one point per job, labelled by scene and GPU."""
    points = [j for j in data.jobs if j.psnr is not None]
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    try:
        groups: dict[str, list[JobReport]] = {}
        for j in points:
            groups.setdefault(f"{j.gpu} / {j.backend}", []).append(j)
        for name, js in sorted(groups.items()):
            ax.scatter([j.cost for j in js], [float(j.psnr or 0.0) for j in js], label=name, s=30)
            for j in js:
                ax.annotate(j.scene, (j.cost, j.psnr), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        currency = {j.currency for j in points} - {""}
        ax.set_xlabel("cost" + (f" ({currency.pop()})" if len(currency) == 1 else ""))
        ax.set_ylabel("PSNR (dB)")
        ax.set_title("PSNR vs cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _svg(fig)
    finally:
        plt.close(fig)


def plot_training_curves(data: ReportData) -> str | None:
    """Loss and PSNR against training seconds, one line per job, from train_log.csv."""
    logs = [(j, read_train_log(j.train_log)) for j in data.jobs if j.train_log is not None]
    logs = [(j, pts) for j, pts in logs if pts]
    if not logs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    try:
        for j, pts in logs:
            label = f"{j.scene} · {j.gpu} · {j.backend}" + (
                f" · {j.run_id}" if len(data.run_ids) > 1 else "")
            loss = [(p.seconds, p.loss) for p in pts if p.loss is not None and p.loss > 0]
            if loss:
                ax_loss.plot(*zip(*loss), label=label, lw=1.2)
            psnr = [(p.seconds, p.psnr) for p in pts if p.psnr is not None]
            if psnr:
                ax_psnr.plot(*zip(*psnr), label=label, lw=1.2, marker="." if len(psnr) < 20 else None)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("training seconds")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("training loss")
        ax_psnr.set_xlabel("training seconds")
        ax_psnr.set_ylabel("PSNR (dB)")
        ax_psnr.set_title("training PSNR")
        for ax in (ax_loss, ax_psnr):
            ax.grid(alpha=0.3)
        ax_psnr.legend(fontsize=7)
        return _svg(fig)
    finally:
        plt.close(fig)


def _video_src(path: Path, html_dir: Path, embed_max_bytes: int) -> str:
    if path.stat().st_size <= embed_max_bytes:
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    try:
        rel = os.path.relpath(path.resolve(), html_dir.resolve())
    except ValueError:                    # another drive (Windows): fall back to a file URI
        return path.resolve().as_uri()
    return "/".join(escape(part, quote=True) for part in Path(rel).parts)


def _videos(data: ReportData, html_dir: Path, embed_max_bytes: int) -> str:
    figs = []
    for j in data.jobs:
        video = j.video("compare")
        if video is None:
            continue
        src = _video_src(video, html_dir, embed_max_bytes)
        figs.append(
            f'<figure><video data-job="{escape(j.job_id)}" data-run="{escape(j.run_id)}" '
            f'data-file="{escape(str(video))}" src="{src}" controls muted loop autoplay '
            f'playsinline preload="auto"></video><figcaption>{escape(j.scene)} · {escape(j.gpu)}'
            f" · {escape(j.backend)} — {escape(fmt(j.psnr, 'psnr'))} dB (render | ground truth)"
            f' <span class="err"></span></figcaption></figure>')
    if not figs:
        return '<p class="note">No comparison videos found.</p>'
    return f'<div class="videos">{"".join(figs)}</div>'


def to_html(data: ReportData, *, html_dir: Path | None = None,
            embed_video_max_bytes: int = EMBED_VIDEO_MAX_BYTES) -> str:
    """The whole page. `html_dir` is where the page will be written (video paths are relative
    to it); the current directory when not given."""
    html_dir = html_dir or Path.cwd()
    title = f"orchestrate report: {', '.join(data.run_ids) or 'no runs'}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}"
             f"</title><style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f'<p class="note">Generated {escape(data.generated_at)}. PSNR and SSIM: mean over '
             f"the test frames of each job's metrics.csv.</p>",
             f'<p class="note" id="cost-per-db-definition">{escape(COST_PER_DB_DEFINITION)}.</p>']
    if not data.jobs:
        parts.append('<p class="note">No jobs in the ledger for these runs.</p></body></html>')
        return "".join(parts)
    results = results_frame(data)
    parts += ["<h2>Results</h2>",
              _table(results, "results", row_class=lambda r: "mean" if r["run"] == "mean" else ""),
              "<h2>PSNR: scene × GPU / backend</h2>", _table(psnr_pivot(data), "pivot", index=True),
              "<h2>Beside published figures</h2>", f'<p class="note">{escape(BACKGROUND_NOTE)}</p>',
              _table(reference_frame(data), "reference",
                     row_class=lambda r: "ours" if str(r["method"]).startswith("ours") else ""),
              '<ul class="comparison">' + "".join(f"<li>{escape(x)}</li>" for x in comparison_lines(data)) + "</ul>",
              "<h2>Estimate vs actual</h2>",
              f'<p class="note">{escape(ESTIMATE_NOTE)}</p>',
              _table(estimate_frame(data), "estimates"), "<h2>Plots</h2><div class=plots>"]
    for plot_id, svg in (("plot-psnr-cost", plot_psnr_vs_cost(data)),
                         ("plot-training", plot_training_curves(data))):
        if svg:
            parts.append(f'<figure id="{plot_id}">{svg}</figure>')
    parts.append("</div>")
    if data.notes:
        parts.append('<h2>Notes</h2><ul id="notes">'
                     + "".join(f"<li>{escape(n)}</li>" for n in data.notes) + "</ul>")
    parts += ["<h2>Render vs ground truth</h2>",
              _videos(data, html_dir, embed_video_max_bytes),
              f"<script>{SCRIPT}</script></body></html>"]
    return "".join(parts)
