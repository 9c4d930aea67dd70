"""Training: Adam on the hash grid and MLPs, occupancy-grid marching, adaptive ray batches.

`train()` is the API the payload uses; `Trainer` is the step-by-step engine (benchmarks drive it
directly). Time spent in callbacks and snapshots is not counted as training time.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .contract import BACKENDS, DEVICES, FIELD_KINDS, LOSSES, PRECISIONS
from .data import load_image, load_poses, load_split, validate_dataset
from .defaults import DeviceDefaults, device_defaults
from .encoding import HashGridConfig
from .errors import ConfigError, NgpError
from .field_config import FieldConfig
from .model import ModelConfig, NerfModel, camera_rays, composite_premultiplied
from .occupancy import should_update
from .precision import make_grad_scaler, resolve_precision
from .snapshot import load_snapshot, save_snapshot

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float, "float | None", float], None]
SNAPSHOT_NAME = "snapshot.pt"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 30000
    max_seconds: float | None = None
    backend: str = "auto"                 # auto | torch | tcnn
    device: str = "auto"                  # auto | cpu | cuda
    downscale: int = 1
    seed: int = 0
    eval: bool = True
    loss: str = "l2"                      # l2 | huber
    lr: float = 1e-2
    field_kind: str = "ngp"               # ngp | pe (positional-encoding baseline)
    # None: device default (see defaults.py)
    log2_hashmap_size: int | None = None
    max_resolution: float | None = None
    occupancy_resolution: int | None = None
    march_steps: int | None = None
    target_samples_per_step: int | None = None
    use_occupancy: bool = True
    snapshot_every_s: float = 10.0
    progress_every: int = 10              # also how often loss/PSNR/sample counts are read back from the GPU
    eval_max_frames: int | None = None
    precision: str = "auto"               # auto | fp32 | bf16 | fp16-scaled (see precision.py)
    # None: device default (defaults.py)
    march_buffer_multiple: int | None = None
    early_stop: bool | None = None
    sync_free: bool | None = None


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    train_seconds: float
    snapshot_path: Path
    backend: str
    device: str
    device_name: str
    final_loss: float | None
    resumed_from_step: int | None
    psnr_mean: float | None = None
    ssim_mean: float | None = None
    summary_path: Path | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda")
    raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    from .tcnn_backend import tcnn_available

    if backend == "torch":
        return "torch"
    if backend == "tcnn":
        if device.type != "cuda" or not tcnn_available():
            raise ConfigError("backend 'tcnn' needs a CUDA device and the tinycudann package; use --backend torch")
        return "tcnn"
    if backend == "auto":
        return "tcnn" if device.type == "cuda" and tcnn_available() else "torch"
    raise ConfigError(f"backend must be auto, torch or tcnn, got {backend!r}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def check_config(cfg: TrainConfig) -> None:
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {cfg.steps!r}")
    if cfg.max_seconds is not None and cfg.max_seconds <= 0:
        raise ConfigError(f"max_seconds must be > 0, got {cfg.max_seconds!r}")
    if not isinstance(cfg.downscale, int) or cfg.downscale < 1:
        raise ConfigError(f"downscale must be an integer >= 1, got {cfg.downscale!r}")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss must be {' or '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.field_kind not in FIELD_KINDS:
        raise ConfigError(f"field_kind must be {' or '.join(FIELD_KINDS)}, got {cfg.field_kind!r}")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend must be {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.march_buffer_multiple is not None and (not isinstance(cfg.march_buffer_multiple, int)
                                                  or cfg.march_buffer_multiple < 1):
        raise ConfigError(f"march_buffer_multiple must be an integer >= 1, got {cfg.march_buffer_multiple!r}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device must be {', '.join(DEVICES)}, got {cfg.device!r}")


def build_model_config(cfg: TrainConfig, dd: DeviceDefaults) -> ModelConfig:
    pick = lambda v, d: d if v is None else v  # noqa: E731
    grid = HashGridConfig(log2_hashmap_size=pick(cfg.log2_hashmap_size, dd.log2_hashmap_size),
                          max_resolution=float(pick(cfg.max_resolution, dd.max_resolution)))
    return ModelConfig(field=FieldConfig(kind=cfg.field_kind, grid=grid),
                       occupancy_resolution=pick(cfg.occupancy_resolution, dd.occupancy_resolution),
                       march_steps=pick(cfg.march_steps, dd.march_steps), use_occupancy=cfg.use_occupancy,
                       grid_update_every=dd.grid_update_every, grid_warmup_steps=dd.grid_warmup_steps,
                       grid_sample_fraction=dd.grid_sample_fraction)


def lr_at(step: int, total_steps: int, base_lr: float) -> float:
    """instant-ngp's exponential decay (×0.33 every interval after a start), scaled from its
    30k-step schedule (start 20k, interval 10k) to `total_steps`."""
    start = max(1, round(total_steps * 2 / 3))
    interval = max(1, round(total_steps / 3))
    if step < start:
        return base_lr
    return base_lr * 0.33 ** ((step - start) // interval + 1)


class Trainer:
    """One training run over a scene: model, optimiser, data and the resume state."""

    def __init__(self, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.out_dir = Path(out_dir)
        self.info = validate_dataset(self.data_dir)              # before any work: one-line DatasetError
        self.device = resolve_device(cfg.device)
        self.backend = resolve_backend(cfg.backend, self.device)
        self.precision = resolve_precision(cfg.precision, self.device.type, self.backend)
        self.amp_dtype = self.precision.autocast_dtype
        self.scaler = make_grad_scaler(self.device.type, self.precision)
        train = load_split(self.data_dir, "train", cfg.downscale)
        self.width, self.height, self.focal = train.width, train.height, train.focal
        self.images = torch.from_numpy(train.images).to(self.device).contiguous()    # (N,H,W,4) uint8
        self.c2w = torch.from_numpy(train.c2w).to(self.device)                       # (N,4,4)
        self.defaults = device_defaults(self.device.type, max(self.width, self.height))
        pick = lambda v, d: d if v is None else v  # noqa: E731
        self.early_stop = bool(pick(cfg.early_stop, self.defaults.early_stop))
        self.sync_free = bool(pick(cfg.sync_free, self.defaults.sync_free))
        self.march_multiple = int(pick(cfg.march_buffer_multiple, self.defaults.march_buffer_multiple))
        self._pending: tuple[torch.Tensor, ...] | None = None   # device values of the last step, unread
        self.snapshot_path = self.out_dir / SNAPSHOT_NAME
        self.step = 0
        self.train_seconds = 0.0
        self.resumed_from_step: int | None = None
        self.last_loss: float | None = None
        self.last_psnr: float | None = None                      # of the last batch
        state = load_snapshot(self.snapshot_path, self.device) if self.snapshot_path.is_file() else None
        self.model_cfg = (ModelConfig.from_dict(state["model_config"]) if state is not None
                          else build_model_config(cfg, self.defaults))
        torch.manual_seed(cfg.seed)
        self.model = NerfModel(self.model_cfg, self.backend, seed=cfg.seed).to(self.device)
        self.model.grid.sync_free = self.sync_free
        self.target_samples = cfg.target_samples_per_step or self.defaults.target_samples_per_step
        self.capacity = self.target_samples * self.march_multiple                  # marched-sample cap
        # The sync-free path marches a dense (rays x steps) layout: bound it to ~2^27 candidates.
        self.max_rays = min(1 << 18, max(64, (1 << 27) // (self.model_cfg.march_steps + 1))) \
            if self.sync_free else 1 << 18
        self.n_rays = max(256, self.target_samples // 16)
        self.optimizer = self._make_optimizer()
        if state is not None:
            self._restore(state)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.model.field.grid_parameters(), "weight_decay": 0.0},
                  {"params": self.model.field.mlp_parameters(), "weight_decay": 1e-6}]
        groups = [g for g in groups if g["params"]]
        # The fused kernel is the same update in one pass over each tensor (4x faster on a 2^16-row
        # table here: 1.4 ms instead of 5.9 per step).
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(groups, lr=self.cfg.lr, betas=(0.9, 0.99), eps=1e-15, fused=fused)

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise NgpError(f"{self.snapshot_path}: does not match this model ({type(e).__name__}); "
                           "delete it or use another --out") from None
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.n_rays = int(state.get("n_rays", self.n_rays))
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])       # the grown loss scale, not 2^16 again
        self.last_loss = state.get("loss")
        if "rng" in state:
            torch.set_rng_state(state["rng"].cpu())
        self.resumed_from_step = self.step
        log.info("resumed from %s at step %d", self.snapshot_path, self.step)

    def save(self) -> Path:
        if self._pending is not None:
            self.read_back()                                 # the snapshot records the last loss and batch
        return save_snapshot(self.snapshot_path, {
            "step": self.step, "train_seconds": self.train_seconds, "n_rays": self.n_rays,
            "loss": self.last_loss, "model_config": self.model_cfg.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(), "backend": self.backend, "device": self.device.type,
            "device_defaults": self.defaults.to_dict(), "downscale": self.cfg.downscale,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "image_size": [self.width, self.height]})

    def _update_grid(self) -> None:
        if not self.model_cfg.use_occupancy:
            return
        if not should_update(self.step, self.model_cfg.grid_update_every):
            return

        def density(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                return self.model.density_unit(x).float()

        # On CPU the density pass runs in chunks of the training batch's size: one 2^15-point
        # chunk (a partial update) or 2^16 (the first full pass) spills the encoding's lookup
        # arrays out of the caches and costs more per point than the same points in batch-sized
        # chunks (bench/bench_grid_update.py). CUDA keeps the grid's default.
        if self.device.type == "cpu":
            self.model.grid.update(self.step, density, chunk=self.target_samples)
        else:
            self.model.grid.update(self.step, density)

    def train_step(self, read: bool = True) -> tuple[float | None, int]:
        """One optimisation step; returns (loss, samples the field trained on).

        read=False (the CUDA loop's non-logging steps): nothing is read back from the device and
        (None, -1) is returned; the batch size adapts on the next step that reads. On the
        variable-size (CPU) path the loss is None also when no sample was marched.

        On CPU the step runs with denormals flushed to zero: Adam's moments of rarely hit table
        rows decay below float32's smallest normal number (1.2e-38), where x86 arithmetic
        slows down many times per element, and a value that small changes nothing a step can
        see. The flag is per thread (x86 MXCSR, set in the calling thread), set for the step only and
        cleared after it (it is off by default; CUDA is unaffected)."""
        if self.device.type != "cpu":
            return self._train_step(read)
        torch.set_flush_denormal(True)
        try:
            return self._train_step(read)
        finally:
            torch.set_flush_denormal(False)

    def pixels(self, img: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
        """images[img, py, px] (R, 4) uint8, as one index_select of flat pixel rows (cheaper than
        advanced indexing on CPU)."""
        flat = (img * self.height + py) * self.width + px
        return self.images.view(-1, self.images.shape[-1]).index_select(0, flat)

    def _train_step(self, read: bool) -> tuple[float | None, int]:
        self._update_grid()
        n, dev = self.n_rays, self.device
        img = torch.randint(0, self.images.shape[0], (n,), device=dev)
        px = torch.randint(0, self.width, (n,), device=dev)
        py = torch.randint(0, self.height, (n,), device=dev)
        o, d = camera_rays(self.c2w.index_select(0, img), px, py, self.focal, self.width, self.height)
        rgba = self.pixels(img, py, px).float() * (1.0 / 255.0)                  # uint8 in memory, per batch
        bg = torch.rand((n, 3), device=dev)                      # random background while training
        gt = rgba[:, :3] * rgba[:, 3:] + bg * (1.0 - rgba[:, 3:])
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.cfg.steps, self.cfg.lr)
        if self.sync_free:
            return self._step_fixed(o, d, bg, gt, read)
        # Marched samples are capped at `capacity`: rays that overflow it are dropped for this step
        # (as in instant-ngp), so a step never costs more than planned, even at the start when every
        # cell is occupied and a ray marches ~5x the samples it will later.
        out = self.model.render_rays(o, d, bg, jitter=torch.rand(n, device=dev), amp_dtype=self.amp_dtype,
                                     early_stop=self.early_stop, max_samples=self.capacity)
        self.step += 1
        if out.n_samples == 0:
            return None, 0                                       # nothing to learn from: skip
        rays = out.rgb.shape[0]
        gt = gt[:rays]
        if self.cfg.loss == "huber":
            loss = torch.nn.functional.huber_loss(out.rgb, gt, delta=0.1)
        else:
            loss = torch.nn.functional.mse_loss(out.rgb, gt)
        self._backward_and_step(loss)
        # Adapt the batch so the next step's compacted samples (those the field trains on) reach
        # the target: rays rendered x target / compacted samples, at most x2 or /2 per step.
        want = rays * self.target_samples / out.n_samples
        self.n_rays = int(min(max(want, self.n_rays * 0.5), self.n_rays * 2.0))
        self.n_rays = int(min(max(self.n_rays, 64), self.max_rays))
        if not read:
            return None, out.n_samples
        self.last_loss = float(loss.detach())
        with torch.no_grad():
            mse = float(torch.mean((out.rgb.detach() - gt) ** 2))
        self.last_psnr = -10.0 * math.log10(max(mse, 1e-10))
        return self.last_loss, out.n_samples

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            # Fused Adam unscales inside its kernel and skips a step with inf/nan on the device;
            # update() adjusts the scale there too: no host synchronisation.
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def _step_fixed(self, o: torch.Tensor, d: torch.Tensor, bg: torch.Tensor, gt: torch.Tensor,
                    read: bool) -> tuple[float | None, int]:
        """The sync-free step (batch.py): fixed buffers, the loss over the rays that fit."""
        from .batch import render_train_batch

        b = render_train_batch(self.model, o, d, bg, torch.rand(o.shape[0], device=o.device),
                               target=self.target_samples, capacity=self.capacity, amp_dtype=self.amp_dtype)
        self.step += 1
        mask = b.ray_mask.to(b.rgb.dtype).unsqueeze(1)
        denom = (b.n_rays_used * 3).clamp(min=1).to(b.rgb.dtype)
        if self.cfg.loss == "huber":
            per = torch.nn.functional.huber_loss(b.rgb, gt, delta=0.1, reduction="none")
        else:
            per = (b.rgb - gt) ** 2
        loss = (per * mask).sum() / denom
        self._backward_and_step(loss)
        with torch.no_grad():
            mse = (((b.rgb.detach() - gt) ** 2) * mask).sum() / denom
        self._pending = (loss.detach(), mse, b.n_compacted, b.n_rays_used)
        if not read:
            return None, -1
        return self.read_back()

    def read_back(self) -> tuple[float | None, int]:
        """Read the last sync-free step's loss, PSNR and counts (one synchronisation) and resize
        the batch so the compacted samples reach the target (x4 or /4 at most per read)."""
        if self._pending is None:
            return self.last_loss, 0
        vals = torch.stack([v.double() for v in self._pending]).tolist()
        loss, mse, compacted, rays = vals
        self._pending = None
        if rays > 0 and compacted > 0:
            want = rays * self.target_samples / compacted
            self.n_rays = int(min(max(want, self.n_rays / 4), self.n_rays * 4.0))
        elif rays == 0:
            self.n_rays //= 2                                 # not one ray fitted: far too many
        self.n_rays = int(min(max(self.n_rays, 64), self.max_rays))
        self.last_loss = loss
        self.last_psnr = -10.0 * math.log10(max(mse, 1e-10))
        return loss, int(compacted)

    def _view_indices(self, n: int, max_frames: int | None) -> list[int]:
        if max_frames is None:
            return list(range(n))
        return sorted({round(k * (n - 1) / max(max_frames - 1, 1)) for k in range(max_frames)})

    @torch.no_grad()
    def iter_views(self, split: str = "test", max_frames: int | None = None
                   ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, prediction (H, W, 4) premultiplied RGBA float, ground truth (H, W, 4) uint8
        straight RGBA), both on the training device; poses come from the JSON and each ground
        truth is decoded only when its frame is reached."""
        poses = load_poses(self.data_dir, split, self.cfg.downscale)
        size = None
        self.model.eval()
        try:
            for k in self._view_indices(len(poses.names), max_frames):
                pred = self.model.render_image_rgba(torch.from_numpy(poses.c2w[k]), poses.width, poses.height,
                                                    poses.focal, amp_dtype=self.amp_dtype)
                if size is None:
                    from PIL import Image

                    with Image.open(poses.image_paths[k]) as im:
                        size = im.size
                gt = torch.from_numpy(load_image(poses.image_paths[k], self.cfg.downscale, size)).to(self.device)
                yield poses.names[k], pred, gt
        finally:
            self.model.train()

    @torch.no_grad()
    def render_views(self, split: str = "test", max_frames: int | None = None
                     ) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """Render `split` on white; returns names, predictions and ground truths (H, W, 3) on the CPU."""
        names, preds, gts = [], [], []
        for name, pred, gt in self.iter_views(split, max_frames):
            names.append(name)
            preds.append(composite_premultiplied(pred, 1.0).float().cpu())
            gts.append(composite_straight(gt, 1.0).cpu())
        return names, preds, gts

    def evaluate_psnr(self, split: str = "test", max_frames: int | None = None) -> float:
        from .metrics import psnr_t

        vals = [psnr_t(composite_premultiplied(p, 1.0), composite_straight(g, 1.0))
                for _, p, g in self.iter_views(split, max_frames)]
        return float(torch.stack(vals).mean())


def png_rgba(premultiplied: torch.Tensor) -> torch.Tensor:
    """(H, W, 4) premultiplied float → (H, W, 4) uint8 straight-alpha RGBA, as PNG stores it."""
    a8 = (premultiplied[..., 3:] * 255).round()
    a = a8 * (1.0 / 255.0)
    straight = torch.where(a > 0, premultiplied[..., :3] / a.clamp(min=1e-8), premultiplied[..., :3]).clamp(0, 1)
    return torch.cat([(straight * 255).round(), a8], dim=-1).to(torch.uint8)


def composite_straight(rgba8: torch.Tensor, background: float) -> torch.Tensor:
    """(H, W, 4) uint8 straight-alpha RGBA → (H, W, 3) float32 on `background` (a grey level)."""
    x = rgba8.float() * (1.0 / 255.0)
    return x[..., :3] * x[..., 3:] + background * (1.0 - x[..., 3:])


def _append_log(path: Path, rows: list[tuple[int, float, float, float | None]]) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write("step,seconds,loss,psnr\n")
        for step, secs, loss, p in rows:
            f.write(f"{step},{secs:.3f},{loss:.6g},{'' if p is None else f'{p:.4f}'}\n")


def train(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) on `data_dir`, writing snapshot.pt and train_log.csv to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = Trainer(data_dir, out, cfg)
    log_path = out / "train_log.csv"
    start_step = tr.step
    stopped = False
    pending: list[tuple[int, float, float, float | None]] = []
    last_snap = tr.train_seconds
    log.info("training %s on %s (%s, %s) from step %d to %d", data_dir, tr.device, tr.backend,
             device_name(tr.device), tr.step, cfg.steps)
    while tr.step < cfg.steps:
        if cfg.max_seconds is not None and tr.train_seconds >= cfg.max_seconds:
            break
        if should_stop is not None and should_stop():
            stopped = True
            break
        t0 = time.perf_counter()
        is_log = (tr.step + 1) % cfg.progress_every == 0 or tr.step + 1 == cfg.steps
        loss, _ = tr.train_step(read=is_log)
        if is_log and tr.device.type == "cuda":
            torch.cuda.synchronize()                # the read above already waited; this makes timing exact
        tr.train_seconds += time.perf_counter() - t0
        if loss is not None and is_log:
            pending.append((tr.step, tr.train_seconds, loss, tr.last_psnr))
            if progress is not None:
                progress(tr.step, cfg.steps, loss, tr.last_psnr, tr.train_seconds)
        if tr.train_seconds - last_snap >= cfg.snapshot_every_s:
            _append_log(log_path, pending)
            pending = []
            tr.save()
            last_snap = tr.train_seconds
    if pending:
        _append_log(log_path, pending)
    if tr.step > start_step or not tr.snapshot_path.exists():
        tr.save()
    result = TrainResult(tr.step, tr.train_seconds, tr.snapshot_path, tr.backend, tr.device.type,
                         device_name(tr.device), tr.last_loss, tr.resumed_from_step)
    if stopped or not cfg.eval:
        return result
    return evaluate_and_summarise(tr, result)


BACKGROUNDS = {"white": 1.0, "black": 0.0}


def evaluate_and_summarise(tr: Trainer, result: TrainResult) -> TrainResult:
    """Render the test split once as RGBA and score it on white and on black: out/renders
    (RGBA PNG), out/gt (on white), metrics.csv (white, the NeRF-synthetic convention),
    metrics_black.csv (instant-ngp's --nerf_compatibility figures) and summary.json."""
    from PIL import Image

    from .metrics import FrameMetrics, psnr_t, ssim_t, write_metrics_csv

    t0 = time.perf_counter()
    for sub in ("renders", "gt"):
        (tr.out_dir / sub).mkdir(exist_ok=True)
    names: list[str] = []
    scores: list[torch.Tensor] = []                        # per frame: psnr, ssim on white, on black
    for name, pred, gt in tr.iter_views("test", tr.cfg.eval_max_frames):
        png = png_rgba(pred)                                # scored exactly as saved: straight RGBA, 8 bits
        color = png[..., :3].float() * (1.0 / 255.0)
        alpha = png[..., 3:].float() * (1.0 / 255.0)
        row = []
        for bg in BACKGROUNDS.values():
            p = color * alpha + bg * (1.0 - alpha)
            g = ((composite_straight(gt, bg) * 255).round_() * (1.0 / 255.0))
            row += [psnr_t(p, g), ssim_t(p, g)]
        scores.append(torch.stack(row))
        names.append(name)
        Image.fromarray(png.cpu().numpy(), "RGBA").save(tr.out_dir / "renders" / f"{name}.png")
        Image.fromarray((composite_straight(gt, 1.0) * 255).round_().to(torch.uint8).cpu().numpy()).save(
            tr.out_dir / "gt" / f"{name}.png")
    table = torch.stack(scores).double().cpu().numpy()     # one read-back for all frames
    means = {}
    for j, bg in enumerate(BACKGROUNDS):
        rows = [FrameMetrics(n, float(table[i, 2 * j]), float(table[i, 2 * j + 1])) for i, n in enumerate(names)]
        write_metrics_csv(rows, tr.out_dir / ("metrics.csv" if bg == "white" else f"metrics_{bg}.csv"))
        means[bg] = (float(table[:, 2 * j].mean()), float(table[:, 2 * j + 1].mean()))
    pm, sm = means["white"]
    summary = {"psnr_mean": pm, "ssim_mean": sm, "steps": result.steps, "train_seconds": result.train_seconds,
               "eval_seconds": time.perf_counter() - t0, "backend": result.backend, "device": result.device,
               "device_name": result.device_name, "n_test_images": len(names), "final_loss": result.final_loss,
               "resumed_from_step": result.resumed_from_step, "image_size": [tr.width, tr.height],
               "downscale": tr.cfg.downscale, "seed": tr.cfg.seed, "background": "white",
               "backgrounds": {bg: {"psnr_mean": m[0], "ssim_mean": m[1]} for bg, m in means.items()},
               "precision": tr.precision.name,
               "model_config": tr.model_cfg.to_dict(), "device_defaults": tr.defaults.to_dict(),
               "occupied_fraction": tr.model.grid.occupied_fraction()}
    path = tr.out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    log.info("test PSNR %.2f dB, SSIM %.4f over %d views (on black: %.2f dB, %.4f)", pm, sm, len(names),
             *means["black"])
    return replace(result, psnr_mean=pm, ssim_mean=sm, summary_path=path)
