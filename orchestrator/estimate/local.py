"""A `local` host's first estimate: a few training steps timed on this machine.

Before this user has finished a job on a `local` host, the runtime table can only guess at this
machine's CPU (or GPU). The payload's `probe` subcommand (`python -m remote_payload probe`) runs
the job's own training settings on a tiny generated scene at the job's image size for about
`BUDGET_S` seconds and predicts the training loop's seconds for the requested step counts; it
runs as a subprocess so the controller never imports torch. The result is cached in
`$ORCHESTRATE_HOME/estimate/local-probe.json` under the settings that change a step's cost
(interpreter, payload digest, image size, backend, device, training options), so it runs once per
such key; history replaces it as soon as a job has finished.

`ORCHESTRATE_LOCAL_PROBE=0` turns it off (the runtime table is used instead).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUDGET_S = 3.0                 # seconds of training steps timed
TIMEOUT_S = 120.0              # the whole subprocess (imports, a tiny scene, steps, one render)
BLENDER_SIZE_PX = 800
CACHE_NAME = "local-probe.json"
ENV_SWITCH = "ORCHESTRATE_LOCAL_PROBE"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


def applies(job: Any) -> bool:
    return str(job.host.provider) == "local"


def image_size(job: Any) -> int:
    gen = job.dataset.generate
    side = gen.size if gen is not None else BLENDER_SIZE_PX
    return max(8, side // max(1, int(job.downscale)))


def _python(job: Any) -> str:
    return str(getattr(job.host, "python", None) or sys.executable)


def key_of(job: Any) -> dict[str, Any]:
    """What changes the cost of a step (the scene and the step count do not, or barely)."""
    from ..run.payload import payload_digest

    return {"python": _python(job), "payload": payload_digest(), "size": image_size(job),
            "backend": str(job.backend), "device": str(job.device),
            "train": {k: job.train[k] for k in sorted(job.train)}, "cpus": os.cpu_count()}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


class LocalProbe:
    """Probe results for `local` jobs, from the cache or timed now."""

    def __init__(self, home: Path, *, budget_s: float = BUDGET_S, timeout_s: float = TIMEOUT_S) -> None:
        self.path = Path(home) / "estimate" / CACHE_NAME
        self.budget_s = budget_s
        self.timeout_s = timeout_s
        self._cache: dict[str, Any] | None = None
        self._failed: set[str] = set()

    def _load(self) -> dict[str, Any]:
        if self._cache is None:
            try:
                data = json.loads(self.path.read_text())
                self._cache = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._load(), indent=1, sort_keys=True))
        os.replace(tmp, self.path)             # two estimates at once: the last complete file wins

    def prepare(self, jobs: Iterable[Any]) -> None:
        """Probe once per key for every step count the `local` jobs need (a plan's jobs)."""
        wanted: dict[str, tuple[dict[str, Any], Any, set[int]]] = {}
        for job in jobs:
            if not applies(job):
                continue
            key = key_of(job)
            d = _digest(key)
            entry = wanted.setdefault(d, (key, job, set()))
            entry[2].add(int(job.steps))
        for d, (key, job, steps) in wanted.items():
            have = self._load().get(d)
            known = {int(s) for s in (have or {}).get("predict", {})}
            if not steps <= known and d not in self._failed:
                self._run(d, key, job, steps | known)

    def _run(self, d: str, key: dict[str, Any], job: Any, steps: set[int]) -> None:
        from ..run.payload import SOURCE_ROOT

        cmd = [_python(job), "-m", "remote_payload", "probe", "--size", str(image_size(job)),
               "--budget-s", f"{self.budget_s:g}", "--backend", str(job.backend), "--device", str(job.device)]
        for s in sorted(steps):
            cmd += ["--steps", str(s)]
        for k in sorted(job.train):
            cmd += ["--train-option", f"{k}={_option_text(job.train[k])}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env,
                                  cwd=str(SOURCE_ROOT))
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                                   else f"exit {proc.returncode}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, RuntimeError, ValueError, IndexError) as exc:
            # The probe only sharpens a first estimate: without it the runtime table is used.
            log.info("timing training steps on this machine failed (%s); using the runtime table", exc)
            self._failed.add(d)
            return
        result["wall_s"] = time.monotonic() - t0
        result["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["key"] = key
        self._load()[d] = result
        try:
            self._save()
        except OSError as exc:
            log.info("could not cache the local timing in %s: %s", self.path, exc)

    def result(self, job: Any) -> dict[str, Any] | None:
        """The probe's figures for `job` (probing now when needed), or None."""
        if not applies(job):
            return None
        d = _digest(key_of(job))
        got = self._load().get(d)
        if got is None or str(int(job.steps)) not in got.get("predict", {}):
            self.prepare([job])
            got = self._load().get(d)
        if got is None or str(int(job.steps)) not in got.get("predict", {}):
            return None
        return dict(got)
