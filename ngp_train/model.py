"""A NeRF model: a field, an occupancy grid and the glue that renders rays with them.

World coordinates are mapped to the unit cube as instant-ngp does for synthetic scenes
(`p / (2·bound) + 0.5`, bound 1.5 ⇔ `p·0.33 + 0.5`); marching, the grid and the field all work
in unit-cube coordinates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .field import FieldConfig, make_field
from .occupancy import OccupancyGrid
from .volrend import RenderOutput, Samples, march, volume_render


@dataclass(frozen=True, slots=True)
class ModelConfig:
    field: FieldConfig
    occupancy_resolution: int = 128
    march_steps: int = 1024            # steps across the unit cube's diagonal: step = √3 / march_steps
    bound: float = 1.5
    use_occupancy: bool = True
    grid_update_every: int | None = None
    grid_warmup_steps: int = 256
    grid_sample_fraction: float = 0.25

    @property
    def step_size(self) -> float:
        return math.sqrt(3.0) / self.march_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["field"] = self.field.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        d = dict(d)
        d["field"] = FieldConfig.from_dict(d["field"])
        return ModelConfig(**d)


def camera_rays(c2w: torch.Tensor, px: torch.Tensor, py: torch.Tensor, focal: float, width: int, height: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through pixel centres. c2w (R, 4, 4) or (4, 4); px, py (R,) integer pixel
    coordinates → origins (R, 3), unit directions (R, 3). Blender/OpenGL camera (looks along −Z)."""
    d_cam = torch.stack([(px.to(c2w.dtype) + 0.5 - 0.5 * width) / focal,
                         -(py.to(c2w.dtype) + 0.5 - 0.5 * height) / focal,
                         -torch.ones_like(px, dtype=c2w.dtype)], dim=-1)
    if c2w.dim() == 2:
        d = d_cam @ c2w[:3, :3].T
        o = c2w[:3, 3].expand_as(d)
    else:
        d = torch.einsum("rij,rj->ri", c2w[:, :3, :3], d_cam)
        o = c2w[:, :3, 3]
    return o, d / d.norm(dim=-1, keepdim=True)


class NerfModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "torch", seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.field = make_field(cfg.field, backend, seed)
        self.grid = OccupancyGrid(cfg.occupancy_resolution, min_step_size=cfg.step_size,
                                  warmup_steps=cfg.grid_warmup_steps, sample_fraction=cfg.grid_sample_fraction)

    def to_unit(self, p: torch.Tensor) -> torch.Tensor:
        return p / (2.0 * self.cfg.bound) + 0.5

    def density_unit(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.density(x)[0]

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor, background: torch.Tensor, *,
                    jitter: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None,
                    early_stop: bool = True, max_samples: int | None = None) -> RenderOutput:
        """origins, dirs (R, 3) world; background (3,) or (R, 3). Gradients flow to the field.

        max_samples: a sample budget. When the marched samples exceed it, only the leading rays
        whose samples fit are rendered (as instant-ngp drops the rays of a batch that overflow
        its sample buffer), and the output covers those rays only: rgb (R', 3) with R' ≤ R.
        `n_marched` reports the count before the cut so the caller can resize its next batch.

        early_stop: drop samples behind transmittance < 1e-4 using a gradient-free density pass
        first. While training on CPU this pass costs more than the ~25% of samples it removes, so
        the trainer turns it off there (the dropped samples carry ~zero weight either way).
        amp_dtype: autocast dtype for the field (precision.py), None for fp32.
        """
        amp = {"dtype": amp_dtype or torch.float32, "enabled": amp_dtype is not None}
        o = self.to_unit(origins)
        flags = self.grid.flags() if self.cfg.use_occupancy else None
        with torch.no_grad():
            lo, hi = self.grid.bounds() if self.cfg.use_occupancy else (0.0, 1.0)
            samples = march(o, dirs, self.cfg.step_size, jitter=jitter, box=(lo, hi), occupancy=flags)
        n_marched = samples.n
        if max_samples is not None and n_marched > max_samples:
            ri = samples.ray_indices
            cut = max(int(ri[max_samples]), 1)               # rays before `cut` fit whole (ri is sorted)
            k = int(torch.searchsorted(ri, torch.tensor(cut, device=ri.device)))
            samples = Samples(ri[:k], samples.t_starts[:k], samples.t_ends[:k])
            o, dirs = o[:cut], dirs[:cut]
            if background.dim() == 2:
                background = background[:cut]

        def positions(ts: torch.Tensor, te: torch.Tensor, ri: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return (o.index_select(0, ri) + d * (0.5 * (ts + te)).unsqueeze(1)).clamp(0.0, 1.0)

        def sigma_fn(ts: torch.Tensor, te: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
            with torch.autocast(o.device.type, **amp):
                return self.field.density(positions(ts, te, ri, dirs.index_select(0, ri)))[0].float()

        def rgb_sigma_fn(ts: torch.Tensor, te: torch.Tensor, ri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            d = dirs.index_select(0, ri)                  # gathered once, for the positions and the colour
            with torch.autocast(o.device.type, **amp):
                rgb, sigma = self.field(positions(ts, te, ri, d), d)
            return rgb.float(), sigma.float()

        out = volume_render(samples, o.shape[0], rgb_sigma_fn, background=background,
                            sigma_fn=sigma_fn if early_stop else None)
        return replace(out, n_marched=n_marched)

    @torch.no_grad()
    def render_image(self, c2w: torch.Tensor, width: int, height: int, focal: float,
                     background: torch.Tensor, *, chunk: int | None = None,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(H, W, 3) image in [0, 1] from camera-to-world c2w (4, 4), composited on `background` (3,)."""
        rgba = self.render_image_rgba(c2w, width, height, focal, chunk=chunk, amp_dtype=amp_dtype)
        return composite_premultiplied(rgba, background)

    @torch.no_grad()
    def render_image_rgba(self, c2w: torch.Tensor, width: int, height: int, focal: float, *,
                          chunk: int | None = None, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(H, W, 4) on the model's device: premultiplied colour (the image on black) and opacity,
        so one render serves both background conventions (composite_premultiplied).

        chunk: rays per render call; None sizes it from free device memory (render_chunk) and
        halves it after an out-of-memory error."""
        dev = self.grid.values.device
        py, px = torch.meshgrid(torch.arange(height, device=dev), torch.arange(width, device=dev), indexing="ij")
        px, py = px.reshape(-1), py.reshape(-1)
        black = torch.zeros(3, device=dev)
        c2w = c2w.to(dev)
        size = chunk or render_chunk(dev, self.cfg.march_steps, self.grid.occupied_fraction())
        while True:
            try:
                out = []
                for s in range(0, px.numel(), size):
                    o, d = camera_rays(c2w, px[s:s + size], py[s:s + size], focal, width, height)
                    r = self.render_rays(o, d, black, amp_dtype=amp_dtype)
                    out.append(torch.cat([r.rgb, r.opacity.unsqueeze(1).to(r.rgb.dtype)], dim=1))
                return torch.cat(out).clamp_(0.0, 1.0).view(height, width, 4)
            except torch.OutOfMemoryError:
                if size <= 256 or chunk is not None:
                    raise
                size //= 2
                torch.cuda.empty_cache()


def composite_premultiplied(rgba: torch.Tensor, background: torch.Tensor | float) -> torch.Tensor:
    """(..., 4) premultiplied colour + opacity → (..., 3) on `background` ((3,) or a number)."""
    bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
    return (rgba[..., :3] + (1.0 - rgba[..., 3:]) * bg).clamp(0.0, 1.0)


# Device bytes per marched candidate step of one ray (the dense layout: t0, keep, cell index)
# and per sample the field runs on at evaluation (hash-grid corners and weights, MLP activations).
_BYTES_PER_STEP = 48
_BYTES_PER_SAMPLE = 2048


def render_chunk(device: torch.device, march_steps: int, occupied_fraction: float) -> int:
    """Rays per render call: 8192 on CPU (larger chunks are not faster there); on CUDA the
    largest power of two whose estimated working set fits in half the free memory, between
    2^13 and 2^20 (an 800x800 frame in 5 calls instead of 78 on an 80 GB GPU)."""
    if device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(device)
    steps = march_steps + 1
    per_ray = steps * _BYTES_PER_STEP + steps * max(occupied_fraction, 0.05) * 2 * _BYTES_PER_SAMPLE
    n = int(0.5 * free / per_ray)
    return int(min(max(1 << max(n.bit_length() - 1, 0), 1 << 13), 1 << 20))
