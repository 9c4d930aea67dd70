"""Dataset staging: put a validated NeRF-synthetic scene in the host's content-addressed cache.

`stage_dataset` is what the runner calls; it returns the remote path of the scene directory,
already validated by `remote_payload check-data` so no GPU work starts on bad data.
Generated datasets are made on the host (`python -m ngp_train synth`); mirrored datasets are
fetched by the host from the fastest mirror (issue #7).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import StageProgress, check_remote, content_key, payload_cmd
from .estimate import estimate_staging_seconds
from .generated import stage_generated
from .mirrored import StageTuning, prefetch_mirrored, stage_mirrored
from .preflight import mirror_problem, preflight

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..transport.base import Transport


def stage_dataset(transport: Transport, dataset: DatasetConfig, scene: str, *, python: str,
                  payload_dir: str, progress: StageProgress | None = None,
                  tuning: StageTuning | None = None, stop: Any = None) -> str:
    """Make `scene` of `dataset` available on the host; return the remote scene directory.

    Raises DatasetInvalid (the data is fake or broken: one line from the check) or StagingError
    (no mirror and no local copy worked). `progress(message, done_bytes, total_bytes)` is called
    about twice a second while the host downloads or the controller uploads."""
    if dataset.generate is not None:
        return stage_generated(transport, dataset, scene, python=python, payload_dir=payload_dir)
    return stage_mirrored(transport, dataset, scene, python=python, payload_dir=payload_dir,
                          progress=progress, content_key=content_key, tuning=tuning, stop=stop)


def prefetch_dataset(transport: Transport, dataset: DatasetConfig, scene: str, *, python: str,
                     payload_dir: str, stop: Any = None) -> bool:
    """Download a mirrored scene with any python the host has (no validation, no packages), so
    that a download overlaps the building of the environment; `stage_dataset` then validates.
    False (and nothing raised) for generated data, a cached scene, or any failure."""
    return prefetch_mirrored(transport, dataset, scene, python=python, payload_dir=payload_dir,
                             content_key=content_key, stop=stop)


__all__ = ["StageProgress", "StageTuning", "check_remote", "content_key", "estimate_staging_seconds",
           "mirror_problem", "payload_cmd", "prefetch_dataset", "preflight", "stage_dataset", "stage_generated"]
