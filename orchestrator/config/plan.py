"""The matrix: each experiment expands to scenes × hosts × the product of its list-valued settings.

Job ids are stable and readable: `<experiment>-<scene>-<host>` plus `-<key><value>` for each
list-valued axis, in the order `steps, backend, device, max_seconds, downscale, seed`, then
the list-valued `train:` options in file order (e.g. `ngp-lego-vast-4090-steps30000-lr0.005`).
Two jobs with the same id are an error.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from .model import SETTINGS, DatasetConfig, ExperimentsConfig, HostConfig

_SLUG_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    experiment: str
    scene: str
    host: HostConfig
    dataset: DatasetConfig
    steps: int
    backend: str = "auto"
    device: str = "auto"
    max_seconds: float | None = None
    downscale: int = 1
    seed: int = 0
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    train: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))   # TrainConfig fields

    @property
    def gpu(self) -> str:
        return self.host.gpu

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the ledger and --json (the host and dataset by name)."""
        return {"job_id": self.job_id, "experiment": self.experiment, "scene": self.scene,
                "host": self.host.name, "provider": self.host.provider, "gpu": self.host.gpu,
                "dataset": self.dataset.name, "steps": self.steps, "backend": self.backend,
                "device": self.device, "max_seconds": self.max_seconds, "downscale": self.downscale,
                "seed": self.seed, "settings": dict(self.settings), "train": dict(self.train)}


def slug(value: Any) -> str:
    """A value as it appears in a job id: `30000`, `torch`, `0.5`, `none`."""
    if value is None:
        text = "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return _SLUG_RE.sub("-", text).strip("-") or "x"


def expand(config: ExperimentsConfig) -> list[Job]:
    """Every job of every experiment, in file order (experiment, scene, host, then the axes)."""
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for index, exp in enumerate(config.experiments):
        axes = [k for k in SETTINGS if isinstance(getattr(exp, k), tuple)]
        axes += [k for k, v in exp.train.items() if isinstance(v, tuple)]
        axis_values = [getattr(exp, k) if k in SETTINGS else exp.train[k] for k in axes]
        for scene in exp.scenes:
            for host_name in exp.hosts:
                for combo in itertools.product(*axis_values):
                    chosen = dict(zip(axes, combo))
                    values = {k: chosen.get(k, getattr(exp, k)) for k in SETTINGS}
                    train = {k: chosen.get(k, v) for k, v in exp.train.items()}
                    job_id = "-".join([slug(exp.name), slug(scene), slug(host_name)]
                                      + [f"{k}{slug(chosen[k])}" for k in axes])
                    if job_id in seen:
                        raise ConfigError(
                            f"{config.source_name}:{exp.line}: experiments[{index}]: two jobs get the same id {job_id!r} "
                            f"(from experiments {seen[job_id]!r} and {exp.name!r})",
                            hint="rename one of the experiments or remove the repeated value")
                    seen[job_id] = exp.name
                    jobs.append(Job(job_id=job_id, experiment=exp.name, scene=scene,
                                    host=config.hosts[host_name], dataset=config.datasets[exp.dataset],
                                    settings=MappingProxyType(chosen), train=MappingProxyType(train),
                                    **values))
    return jobs
