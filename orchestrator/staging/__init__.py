"""Dataset staging: put a validated NeRF-synthetic scene in the host's content-addressed cache.

`stage_dataset` is what the runner calls; it returns the remote path of the scene directory,
already validated by `remote_payload check-data` so no GPU work starts on bad data.
Generated datasets are made on the host (`python -m ngp_train synth`); mirrored datasets are
fetched by the host from the fastest mirror (issue #7).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shlex
from typing import TYPE_CHECKING, Any, Callable

from ..errors import DatasetInvalid, StagingError

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..transport.base import Transport

StageProgress = Callable[[str, int, "int | None"], None]   # (message, done_bytes, total_bytes)


def content_key(obj: Any) -> str:
    """First 16 hex of the sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def payload_cmd(python: str, payload_dir: str, args: str) -> str:
    return f"PYTHONPATH={shlex.quote(payload_dir)} {shlex.quote(python)} -m {args}"


def check_remote(transport: "Transport", scene_dir: str, *, python: str, payload_dir: str) -> None:
    """Run `remote_payload check-data` on the host; raise DatasetInvalid with its one line."""
    res = transport.run(payload_cmd(python, payload_dir, f"remote_payload check-data {shlex.quote(scene_dir)}"),
                        check=False, timeout_s=600)
    if res.exit_code == 2:
        line = (res.stderr.strip() or res.stdout.strip() or "invalid dataset").splitlines()[-1]
        raise DatasetInvalid(f"dataset at {scene_dir} is not usable: {line}",
                             hint="fix or replace the dataset; nothing was trained")
    if res.exit_code != 0:
        raise StagingError(f"check-data failed on the host (exit {res.exit_code}): "
                           f"{(res.stderr or res.stdout).strip()[-300:]}")


def stage_generated(transport: "Transport", dataset: "DatasetConfig", scene: str, *, python: str,
                    payload_dir: str) -> str:
    gen = dataset.generate
    assert gen is not None
    spec = {"scene": scene, "size": gen.size, "seed": gen.seed, "kind": "generate"}
    base = f"{transport.root}/cache/datasets/{content_key(spec)}"
    scene_dir = f"{base}/{scene}"
    done = transport.read_text(f"{base}/.complete")
    if done is None:
        # Two runs (two controllers on one host) may generate the same scene at once: one makes
        # it under a lock on the host while the other waits, then finds `.complete`; the temp
        # directory is unique anyway, so nothing is ever generated into another's files.
        q = shlex.quote
        tmp = f"{base}/.tmp-{scene}-{secrets.token_hex(4)}"
        make = (f"if [ -f {q(base + '/.complete')} ]; then exit 0; fi; rm -rf {q(tmp)} && "
                + payload_cmd(python, payload_dir,
                              f"ngp_train synth --out {q(tmp)} --scene {q(scene)} "
                              f"--size {int(gen.size)} --seed {int(gen.seed)}")
                + f" && rm -rf {q(scene_dir)} && mv {q(tmp)} {q(scene_dir)}"
                + f" && printf %s {q(json.dumps(spec))} > {q(base + '/.complete')}"
                + f" || {{ rc=$?; rm -rf {q(tmp)}; exit $rc; }}")
        cmd = (f"mkdir -p {q(base)} && if command -v flock >/dev/null 2>&1; then "
               f"flock -w 1800 {q(base + '/.lock')} bash -c {q(make)}; else bash -c {q(make)}; fi")
        res = transport.run(cmd, check=False, timeout_s=1800)
        if res.exit_code != 0:
            raise StagingError(f"generating scene {scene!r} on the host failed (exit {res.exit_code}): "
                               f"{(res.stderr or res.stdout).strip()[-300:]}")
    check_remote(transport, scene_dir, python=python, payload_dir=payload_dir)
    return scene_dir


def stage_dataset(transport: "Transport", dataset: "DatasetConfig", scene: str, *, python: str,
                  payload_dir: str, progress: StageProgress | None = None,
                  tuning: "StageTuning | None" = None, stop: Any = None) -> str:
    """Make `scene` of `dataset` available on the host; return the remote scene directory.

    Raises DatasetInvalid (the data is fake or broken: one line from the check) or StagingError
    (no mirror and no local copy worked). `progress(message, done_bytes, total_bytes)` is called
    about twice a second while the host downloads or the controller uploads."""
    if dataset.generate is not None:
        return stage_generated(transport, dataset, scene, python=python, payload_dir=payload_dir)
    return stage_mirrored(transport, dataset, scene, python=python, payload_dir=payload_dir,
                          progress=progress, content_key=content_key, tuning=tuning, stop=stop)


from .estimate import estimate_staging_seconds  # noqa: E402  (re-exported for the estimate)
from .mirrored import StageTuning, stage_mirrored  # noqa: E402
from .preflight import mirror_problem, preflight  # noqa: E402  (offline checks before renting)

__all__ = ["StageProgress", "StageTuning", "content_key", "estimate_staging_seconds", "mirror_problem",
           "preflight", "stage_dataset"]
