"""Time a few training steps on this machine, to predict how long a whole run will take.

Used before any job has finished here (the controller's estimate for a `local` host): a tiny
generated scene at the job's image size (the device defaults, and so the cost of a step, follow
the image size), the job's own `TrainConfig`, and the training loop's steps timed one by one
until a time budget is spent. The occupancy-grid updates are timed apart from the steps because
their schedule (every step at first, then every 16) makes the first steps several times dearer
than later ones: the prediction replays the schedule for the requested step counts.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .occupancy import should_update
from .synth import generate_scene
from .train import TrainConfig, Trainer, device_name

# A probe's view set: a few views to sample rays from (rendering is not timed: one tiny view
# took from 0.03 to 2 s on this shared machine, too noisy to scale to a test split); no
# supersampling (image quality does not change what a step costs, and at 800 px it would take
# several seconds per view).
PROBE_VIEWS = {"n_train": 4, "n_val": 1, "n_test": 1}      # synth needs one view per split
LARGE_VIEWS = {"n_train": 1, "n_val": 1, "n_test": 1}     # above 128 px
MIN_STEPS = 6                 # below this the quantiles mean little: allowed up to twice the budget


@dataclass(frozen=True, slots=True)
class ProbeResult:
    device: str
    device_name: str
    backend: str
    threads: int
    import_s: float           # importing torch and the trainer (the caller passes it in)
    init_s: float             # building the trainer: model, optimiser, images to the device
    first_step_s: float       # step 0, with its full grid pass and the first calls' set-up
    step_s: float             # median later step, without the grid update
    full_update_s: float      # a grid update over every cell (the warm-up steps')
    partial_update_s: float   # a later update (a sample of the cells); measured or scaled
    partial_measured: bool
    steps_timed: int
    seconds_timed: float
    uses_grid: bool           # the schedule the prediction replays
    grid_warmup_steps: int
    grid_update_every: int | None

    def train_seconds(self, steps: int) -> float:
        """Seconds of the training loop for `steps` steps (set-up not included)."""
        total = self.first_step_s
        for s in range(1, max(1, steps)):
            total += self.step_s
            if self.uses_grid and should_update(s, self.grid_update_every):
                total += self.full_update_s if s < self.grid_warmup_steps else self.partial_update_s
        return total


def _low(values: list[float]) -> float:
    """The 25th percentile (the median of the faster half)."""
    ordered = sorted(values)
    return statistics.median(ordered[: max(1, (len(ordered) + 1) // 2)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe(cfg: TrainConfig, *, size: int, scene: str = "default", seed: int = 0,
          budget_s: float = 3.0, max_steps: int = 200, import_s: float = 0.0,
          workdir: Path | None = None) -> ProbeResult:
    """Time `cfg`'s training on a generated `size`-pixel scene for about `budget_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="ngp-probe-", dir=workdir) as tmp:
        views = PROBE_VIEWS if size <= 128 else LARGE_VIEWS
        data = generate_scene(Path(tmp) / "scene", scene, size, seed, supersample=1, **views)
        t0 = time.perf_counter()
        tr = Trainer(data, Path(tmp) / "out", dataclasses.replace(cfg, eval=False, max_seconds=None))
        _sync(tr.device)
        init_s = time.perf_counter() - t0
        update = tr._update_grid
        tr._update_grid = lambda: None           # type: ignore[method-assign] # timed apart below
        grid = tr.model.grid
        every = tr.model_cfg.grid_update_every
        warmup = tr.model_cfg.grid_warmup_steps
        steps: list[float] = []
        full: list[float] = []
        partial: list[float] = []
        first = 0.0
        start = time.perf_counter()
        while tr.step < max_steps:
            spent = time.perf_counter() - start
            # two steps at least (the first is no ordinary step), MIN_STEPS when they fit in
            # twice the budget, never more past it
            if tr.step >= 2 and (spent >= 2 * budget_s or (spent >= budget_s and tr.step >= MIN_STEPS)):
                break
            step = tr.step
            is_log = (step + 1) % cfg.progress_every == 0
            a = time.perf_counter()
            if cfg.use_occupancy and should_update(step, every):
                update()
                _sync(tr.device)
                b = time.perf_counter()
                if step > 0:
                    (full if step < warmup else partial).append(b - a)
            else:
                b = a
            tr.train_step(read=is_log)
            _sync(tr.device)
            c = time.perf_counter()
            if step == 0:
                first = c - a
            else:
                steps.append(c - b)
        timed = time.perf_counter() - start
        # A low quantile, not the median: on a shared machine a burst of someone else's work
        # during the few timed seconds slows single steps several-fold (two torch threads on
        # two busy cores), and the probe should describe the machine, not that burst.
        step_s = _low(steps) if steps else first
        # Without a measured warm-up update (the CPU defaults update every cell only at step 0),
        # a full pass costs the first step less an ordinary step.
        full_s = _low(full) if full else max(0.0, first - step_s)
        frac = 2 * getattr(grid, "sample_fraction", 1.0)        # uniform + occupied samples
        partial_s = _low(partial) if partial else full_s * min(1.0, frac)
        return ProbeResult(tr.device.type, device_name(tr.device), tr.backend, torch.get_num_threads(),
                           import_s, init_s, first, step_s, full_s, partial_s, bool(partial),
                           tr.step, timed, bool(cfg.use_occupancy), warmup, every)
