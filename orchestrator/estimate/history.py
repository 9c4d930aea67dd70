"""This user's history: phase timings of finished jobs in the ledger, for the estimate.

A job's recorded phases (ledger `phases` rows) are summed per estimate phase, then the median
over matching succeeded jobs is used. Matching goes from the closest to the broadest scope:
same provider, GPU, steps, dataset and scene first (scenes of one dataset train at different
speeds: the occupancy grid leaves more or less of each); then the same without the scene;
then, for phases that do not depend on the job's size, the same provider (and GPU); training
falls back to a start-up + per-step line through the same GPU's finished jobs of other step
counts (this scene's, when it has two step counts).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.plan import Job
    from ..ledger import Ledger

# Phase names the runner may record -> the estimate's phase. Several recorded phases that map
# to the same estimate phase are added up (e.g. render + metrics + videos -> eval).
PHASE_ALIASES: dict[str, str] = {
    "boot": "boot", "provision": "boot", "create": "boot", "wait_ready": "boot",
    "setup": "setup", "connect": "setup", "bootstrap": "setup", "push": "setup", "push_payload": "setup",
    "staging": "staging", "stage": "staging", "stage_dataset": "staging",
    "train": "train", "training": "train",
    "eval": "eval", "evaluation": "eval", "render": "eval", "gt": "eval", "metrics": "eval",
    "summary": "eval", "videos": "eval",
    "pull": "pull", "pull_results": "pull", "download": "pull",
    "teardown": "teardown", "stop": "teardown", "destroy": "teardown",
}
SUCCEEDED = "succeeded"


@dataclass(frozen=True, slots=True)
class _Past:
    provider: str
    gpu: str
    steps: int
    dataset: str
    scene: str
    phases: dict[str, float]


class History:
    """Succeeded jobs' phase seconds, indexed for the estimate."""

    def __init__(self, past: list[_Past]) -> None:
        self.past = past

    @classmethod
    def from_ledger(cls, ledger: Ledger) -> History:
        by_job: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for row in ledger.phases():
            phase = PHASE_ALIASES.get(str(row.get("phase") or ""))
            if phase is not None and row.get("seconds") is not None:
                by_job[(row["run_id"], row["job_id"])][phase] += float(row["seconds"])
        past = []
        for j in ledger.jobs():
            phases = by_job.get((j.run_id, j.job_id))
            if j.status == SUCCEEDED and phases:
                past.append(_Past(j.provider, j.gpu, int(j.steps or 0), j.dataset, str(j.scene or ""), dict(phases)))
        return cls(past)

    def _median(self, phase: str, match: Any) -> tuple[float, int] | None:
        values = [p.phases[phase] for p in self.past if phase in p.phases and match(p)]
        if not values:
            return None
        return statistics.median(values), len(values)

    def phase_seconds(self, job: Job, phase: str) -> tuple[float, int, str] | None:
        """(median seconds, count, scope) for `phase` of jobs like `job`, or None."""
        prov, gpu, ds, scene = job.host.provider, job.host.gpu, job.dataset.name, job.scene
        scopes: list[tuple[str, Any]] = [
            (f"{prov}/{gpu}, {job.steps} steps, dataset {ds}, scene {scene}",
             lambda p: (p.provider, p.gpu, p.steps, p.dataset, p.scene) == (prov, gpu, job.steps, ds, scene)),
            (f"{prov}/{gpu}, {job.steps} steps, dataset {ds}",
             lambda p: (p.provider, p.gpu, p.steps, p.dataset) == (prov, gpu, job.steps, ds))]
        if phase in ("boot", "setup", "teardown", "pull"):
            scopes.append((f"{prov}/{gpu}", lambda p: (p.provider, p.gpu) == (prov, gpu)))
            scopes.append((f"{prov}", lambda p: p.provider == prov))
        elif phase == "staging":
            scopes.append((f"{prov}, dataset {ds}", lambda p: (p.provider, p.dataset) == (prov, ds)))
        elif phase == "eval":
            scopes.append((f"{gpu}, dataset {ds}", lambda p: (p.gpu, p.dataset) == (gpu, ds)))
        for scope, match in scopes:
            got = self._median(phase, match)
            if got is not None:
                return got[0], got[1], f"finished jobs on {scope}"
        return None

    def train_points(self, job: Job) -> list[tuple[int, float, int]]:
        """(steps, median training seconds, count) per step count of succeeded jobs on the same
        GPU and device: what a start-up + per-step line is fitted to."""
        by_steps: dict[int, list[float]] = defaultdict(list)
        same_gpu = [p for p in self.past if p.gpu == job.host.gpu and p.steps > 0 and p.phases.get("train", 0) > 0]
        same_scene = [p for p in same_gpu if (p.dataset, p.scene) == (job.dataset.name, job.scene)]
        # this scene's own pace when it has trained here at two step counts (a line needs two)
        for p in same_scene if len({q.steps for q in same_scene}) >= 2 else same_gpu:
            by_steps[p.steps].append(p.phases["train"])
        return [(s, statistics.median(v), len(v)) for s, v in sorted(by_steps.items())]
