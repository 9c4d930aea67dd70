"""The report's tables as pandas frames, and the Markdown, CSV and JSON renderings.

pandas is imported lazily: importing this module costs nothing until a table is built.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from .collect import BACKGROUND_NOTE, COST_PER_DB_DEFINITION, ReportData

if TYPE_CHECKING:
    import pandas as pd

RESULT_COLUMNS = ("run", "job", "scene", "gpu", "backend", "steps", "train", "status", "psnr", "ssim",
                  "train_s", "cost", "currency", "cost_per_db")
NUMERIC = ("psnr", "ssim", "train_s", "cost", "cost_per_db")
DECIMALS = {"psnr": 2, "ssim": 4, "train_s": 1, "estimate_s": 1, "actual_s": 1,
            "seconds_error_pct": 1, "cost_error_pct": 1, "average": 2}
MONEY = ("cost", "cost_per_db", "estimate_cost", "actual_cost")


def results_frame(data: ReportData, *, with_mean: bool = True) -> pd.DataFrame:
    """One row per job (scene × GPU × backend, across runs), then a mean row."""
    import pandas as pd

    rows = [{"run": j.run_id, "job": j.job_id, "scene": j.scene, "gpu": j.gpu,
             "backend": j.backend, "steps": j.steps, "train": j.train, "status": j.status, "psnr": j.psnr,
             "ssim": j.ssim, "train_s": j.train_seconds, "cost": j.cost,
             "currency": j.currency, "cost_per_db": j.cost_per_db} for j in data.jobs]
    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if with_mean and len(df):
        currencies = set(df["currency"].dropna()) - {""}
        mean: dict[str, Any] = {c: "" for c in RESULT_COLUMNS}
        mean.update({"run": "mean", "job": f"{len(df)} jobs"})
        for c in NUMERIC:
            mean[c] = df[c].mean(skipna=True)
        if len(currencies) > 1:       # averaging USD with CNY means nothing
            mean["cost"] = mean["cost_per_db"] = float("nan")
        mean["currency"] = currencies.pop() if len(currencies) == 1 else ""
        df = pd.concat([df, pd.DataFrame([mean])], ignore_index=True)
    return df


def psnr_pivot(data: ReportData) -> pd.DataFrame:
    """Mean PSNR, scenes down, GPU / backend across."""
    df = results_frame(data, with_mean=False)
    if df.empty:
        return df
    df["gpu / backend"] = df["gpu"] + " / " + df["backend"]
    return df.pivot_table(index="scene", columns="gpu / backend", values="psnr", aggfunc="mean")


def reference_frame(data: ReportData) -> pd.DataFrame:
    """Published figures (paper, peers) beside ours per scene, with background and source."""
    import pandas as pd

    ours = results_frame(data, with_mean=False)
    scenes = [s for s in ("mic", "ficus", "chair", "hotdog", "materials", "drums", "ship", "lego")]
    scenes += sorted(set(ours["scene"]) - set(scenes)) if len(ours) else []
    rows = []
    for r in data.reference:
        row: dict[str, Any] = {"method": r.method, "gpu": r.gpu, "budget": r.budget, "background": r.background}
        row.update({s: r.psnr_by_scene.get(s) for s in scenes})
        row.update({"average": r.average, "source": r.source})
        rows.append(row)
    if len(ours):
        ours["psnr_black"] = [j.psnr_black for j in data.jobs]
        for (gpu, backend), g in ours.groupby(["gpu", "backend"], sort=True):
            steps = sorted(set(int(s) for s in g["steps"]))
            for column, background in (("psnr", "white"), ("psnr_black", "black")):
                by_scene = pd.to_numeric(g[column], errors="coerce").groupby(g["scene"]).mean().dropna()
                if by_scene.empty:
                    continue
                name = f"ours ({gpu}, {backend})" + (", on black" if background == "black" else "")
                row = {"method": name, "gpu": gpu,
                       "budget": "/".join(str(s) for s in steps) + " steps", "background": background}
                row.update({s: by_scene.get(s) for s in scenes})
                row.update({"average": by_scene.mean(), "source": "this report"})
                rows.append(row)
    df = pd.DataFrame(rows)
    for s in scenes + ["average"]:
        if s in df:
            df[s] = pd.to_numeric(df[s], errors="coerce")
    return df


def comparison_lines(data: ReportData) -> list[str]:
    """Per scene and GPU / backend: "Δ dB vs <published row> at <our cost>", each published row
    against our score under the same background convention (its `background` column)."""
    groups: dict[tuple[str, str, str], list] = {}
    for j in data.jobs:
        groups.setdefault((j.scene, j.gpu, j.backend), []).append(j)
    lines = []
    for (scene, gpu, backend), jobs in sorted(groups.items()):
        cost = sum(j.cost for j in jobs) / len(jobs)
        currency = jobs[0].currency
        for r in data.reference:
            published = r.psnr_by_scene.get(scene)
            black = r.background.strip().lower().startswith("black")
            ours = [j.psnr_black if black else j.psnr for j in jobs]
            ours = [v for v in ours if v is not None and math.isfinite(v)]
            if published is None or not ours:
                continue
            delta = sum(ours) / len(ours) - published
            lines.append(f"{scene} ({gpu}, {backend}): {delta:+.2f} dB vs {r.method} "
                         f"[{'black' if black else 'white'}] at {cost:.4g} {currency}".rstrip())
    return lines


ESTIMATE_NOTE = ("Error % = (estimate − actual) / actual. Seconds are billed wall time (the "
                 "instance's GPU intervals, before rounding); cost is recomputed from billing "
                 "intervals.")


def estimate_frame(data: ReportData) -> pd.DataFrame:
    """Estimate vs actual per job: billed wall seconds and cost."""
    import pandas as pd

    rows = [{"run": j.run_id, "job": j.job_id, "estimate_s": j.estimate.estimate_seconds,
             "actual_s": j.estimate.actual_seconds,
             "seconds_error_pct": j.estimate.seconds_error_pct,
             "estimate_cost": j.estimate.estimate_cost, "actual_cost": j.estimate.actual_cost,
             "cost_error_pct": j.estimate.cost_error_pct, "source": j.estimate.source}
            for j in data.jobs]
    df = pd.DataFrame(rows, columns=["run", "job", "estimate_s", "actual_s", "seconds_error_pct",
                                     "estimate_cost", "actual_cost", "cost_error_pct", "source"])
    for c in ("estimate_s", "actual_s", "seconds_error_pct", "estimate_cost", "actual_cost",
              "cost_error_pct"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def fmt(value: Any, column: str = "") -> str:
    """A cell as people read it: fixed decimals per column, blank for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if column in MONEY and 0 < abs(value) < 1:     # small sums: 3 significant digits
            return f"{value:.{max(2, 2 - math.floor(math.log10(abs(value))))}f}"
        return f"{value:.{DECIMALS.get(column, 2)}f}"
    return str(value)


def markdown_table(df: pd.DataFrame, *, index: bool = False) -> str:
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if df[c].dtype.kind in "fi" else "---" for c in df.columns) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c], str(c)).replace("|", "\\|")
                                       for c in df.columns) + " |")
    return "\n".join(lines)


def to_markdown(data: ReportData) -> str:
    parts = [f"# Results ({', '.join(data.run_ids) or 'no runs'})", "",
             f"Generated {data.generated_at}. PSNR/SSIM: mean over test frames of metrics.csv.",
             f"{COST_PER_DB_DEFINITION}.", ""]
    if not data.jobs:
        parts += ["No jobs in the ledger for these runs.", ""]
        return "\n".join(parts)
    parts += [markdown_table(results_frame(data)), "", "## PSNR: scene × GPU / backend", "",
              markdown_table(psnr_pivot(data), index=True), "",
              "## Beside published figures", "", BACKGROUND_NOTE, "",
              markdown_table(reference_frame(data)), "",
              *[f"- {line}" for line in comparison_lines(data)], "",
              "## Estimate vs actual", "",
              ESTIMATE_NOTE, "", markdown_table(estimate_frame(data)), ""]
    if data.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    return "\n".join(parts)


def to_csv(data: ReportData) -> str:
    return results_frame(data).to_csv(index=False, float_format="%.6g")


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({str(k): (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in rec.items()})
    return out


def to_json_obj(data: ReportData) -> dict[str, Any]:
    res = results_frame(data)
    pivot = psnr_pivot(data)
    return {
        "runs": list(data.run_ids),
        "generated_at": data.generated_at,
        "definitions": {"cost_per_db": COST_PER_DB_DEFINITION, "background": BACKGROUND_NOTE,
                        "psnr": "mean over test frames of metrics.csv (per-image PSNR averaged)"},
        "jobs": _records(res[res["run"] != "mean"]),
        "mean": _records(res[res["run"] == "mean"])[0] if len(res) else None,
        "psnr_pivot": {} if pivot.empty else {
            str(scene): {str(k): (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in row.items()} for scene, row in pivot.iterrows()},
        "reference": _records(reference_frame(data)),
        "comparison": comparison_lines(data),
        "estimate_vs_actual": [
            {**rec, "phases_s": {ph: {"estimate": j.estimate.estimate_phases_s.get(ph),
                                      "actual": j.estimate.actual_phases_s.get(ph)}
                                 for ph in dict.fromkeys([*j.estimate.estimate_phases_s,
                                                          *j.estimate.actual_phases_s])}}
            for rec, j in zip(_records(estimate_frame(data)), data.jobs)],
        "estimate_note": ESTIMATE_NOTE,
        "notes": list(data.notes),
    }


def to_json(data: ReportData) -> str:
    return json.dumps(to_json_obj(data), indent=2, default=str)
