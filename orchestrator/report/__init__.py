"""`orchestrate report`: results across runs, read-only over the ledger and run directories.

    collect  — gather jobs, metrics (recomputed from metrics.csv), costs (from billing
               intervals), estimates vs actual phases, and the published reference figures
    tables   — pandas frames; Markdown, CSV and JSON renderings
    html     — one self-contained page: tables, inline SVG plots, inline videos
"""
from __future__ import annotations

from pathlib import Path

from ..ledger import Ledger
from .collect import (
    BACKGROUND_NOTE,
    COST_PER_DB_DEFINITION,
    JobReport,
    ReportData,
    ReportError,
    collect,
    read_metrics,
    read_train_log,
)

FORMATS = ("md", "csv", "html", "json")

__all__ = ["BACKGROUND_NOTE", "COST_PER_DB_DEFINITION", "FORMATS", "JobReport", "ReportData",
           "ReportError", "collect", "read_metrics", "read_train_log", "render", "write_report"]


def render(data: ReportData, fmt: str, *, html_dir: Path | None = None,
           embed_video_max_bytes: int | None = None) -> str:
    """The report as text in one of FORMATS."""
    from . import tables

    if fmt == "md":
        return tables.to_markdown(data)
    if fmt == "csv":
        return tables.to_csv(data)
    if fmt == "json":
        return tables.to_json(data)
    if fmt == "html":
        from . import html

        kwargs = {} if embed_video_max_bytes is None else {
            "embed_video_max_bytes": embed_video_max_bytes}
        return html.to_html(data, html_dir=html_dir, **kwargs)
    raise ReportError(f"unknown report format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")


def write_report(ledger: Ledger, runs: list[str] | None, fmt: str, out: Path | None = None, *,
                 runs_root: Path | None = None, embed_video_max_bytes: int | None = None) -> str:
    """Collect and render; write to `out` when given. Returns the rendered text."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    data = collect(ledger, runs, runs_root=runs_root)
    html_dir = out.parent if out is not None else None
    text = render(data, fmt, html_dir=html_dir, embed_video_max_bytes=embed_video_max_bytes)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ReportError(f"cannot write the report to {out}: {exc.strerror or exc}",
                              hint="choose a writable --out path") from None
    return text
