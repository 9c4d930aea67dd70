"""instant-ngp's training batch in fixed-size buffers: no host synchronisation per step.

The variable-size path (model.render_rays) asks the device how many samples were marched
(`nonzero`, a sample-budget cut, `bincount`): every such answer stops the host until the GPU
catches up. Here every size is fixed in advance, as instant-ngp's buffers are:

1. march: the dense (rays × steps) layout, then the kept steps of the leading rays that fit
   whole are scattered into a buffer of `capacity` marched samples (the rest of the buffer is
   padding that points at a dummy ray and carries zero density);
2. compaction: densities without gradient on that buffer give the transmittance; samples
   behind T < 1e-4 are dropped and the surviving ("compacted") samples of the leading rays that
   fit whole go into a buffer of `target` samples;
3. the field runs with gradients on the `target` buffer only, and the rays are composited.

Counts stay on the device (`n_marched`, `n_compacted`, `n_rays_used`); the trainer reads them
on logging steps to resize the next batches so the compacted samples reach the target.
Rays dropped for lack of room are masked out of the loss (`ray_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .volrend import candidates, ray_aabb

if TYPE_CHECKING:
    from .model import NerfModel


@dataclass(frozen=True, slots=True)
class FixedBatch:
    rgb: torch.Tensor            # (R, 3) composited on the background
    ray_mask: torch.Tensor       # (R,) bool: rays whose samples all fit both buffers
    n_marched: torch.Tensor      # 0-d int64: samples marched by all R rays, before any cut
    n_compacted: torch.Tensor    # 0-d int64: samples the field ran on with gradients
    n_rays_used: torch.Tensor    # 0-d int64: rays in the loss
    n_marched_used: torch.Tensor  # 0-d int64: marched samples in the buffer (<= capacity)


def _compact(keep: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of keep (M,) packed into `size` slots, in order.

    Returns (src (size,) int64: index into keep's domain, or M for an empty slot; valid (size,)).
    Entries beyond `size` are dropped (callers keep whole rays only, so none are)."""
    m = keep.numel()
    pos = torch.cumsum(keep, 0) - 1
    dest = torch.where(keep & (pos < size), pos, torch.full_like(pos, size))       # slot `size`: discarded
    src = torch.full((size + 1,), m, dtype=torch.int64, device=keep.device)
    src.scatter_(0, dest, torch.arange(m, device=keep.device))
    src = src[:size]
    return src, src < m


def _whole_rays(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays (in order) whose counts fit in `size` whole: (fits (R,) bool, start offset (R,))."""
    end = torch.cumsum(counts, 0)
    fits = end <= size
    kept = counts * fits
    return fits, torch.cumsum(kept, 0) - kept


def _transmittance(tau: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """T_i = exp(-Σ_{j<i, same ray} τ_j) for samples sorted by ray; start (S,): the buffer index
    of each sample's ray's first sample."""
    cs = torch.cumsum(tau.double(), 0)
    excl = cs - tau.double()
    return torch.exp(-(excl - excl[start])).to(tau.dtype)


def render_train_batch(model: NerfModel, origins: torch.Tensor, dirs: torch.Tensor, background: torch.Tensor,
                       jitter: torch.Tensor | None, *, target: int, capacity: int,
                       amp_dtype: torch.dtype | None = None, early_stop_eps: float = 1e-4) -> FixedBatch:
    """Render R training rays in fixed buffers (see the module doc). origins, dirs (R, 3) world;
    background (3,) or (R, 3); target: compacted samples; capacity: marched samples."""
    cfg = model.cfg
    dev = origins.device
    r = origins.shape[0]
    step = cfg.step_size
    k_max = cfg.march_steps + 1                       # steps across the unit cube's diagonal
    o = model.to_unit(origins)
    with torch.no_grad():
        if cfg.use_occupancy:
            lo, hi = model.grid.bounds()
            flags = model.grid.flags_or_all()
        else:
            lo, hi, flags = torch.zeros(3, device=dev), torch.ones(3, device=dev), None
        t_near, t_far, hit = ray_aabb(o, dirs, lo, hi)
        t0, keep = candidates(o, dirs, step, k_max, jitter=jitter, box=(lo, hi), occupancy=flags,
                              t_near=t_near, t_far=t_far, hit=hit)
        per_ray = keep.sum(1)                                                        # (R,)
        n_marched = per_ray.sum()
        fits1, start1 = _whole_rays(per_ray, capacity)
        keep &= fits1.unsqueeze(1)
        src, valid = _compact(keep.reshape(-1), capacity)                            # (C,)
        srcc = src.clamp(max=r * k_max - 1)
        ri = torch.where(valid, srcc // k_max, torch.full_like(srcc, r))              # dummy ray r for padding
        ts = t0.reshape(-1)[srcc]
        o_pad = torch.cat([o, o.new_full((1, 3), 0.5)])
        d_pad = torch.cat([dirs, dirs.new_tensor([[1.0, 0.0, 0.0]])])
        start1_pad = torch.cat([start1, start1.new_zeros(1)])

        def positions(idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return (o_pad[idx] + d_pad[idx] * (t + 0.5 * step).unsqueeze(1)).clamp(0.0, 1.0)

        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            sigma = model.field.density(positions(ri, ts))[0].float()
        sigma = torch.where(valid, sigma, torch.zeros_like(sigma))
        trans = _transmittance(sigma * step, start1_pad[ri])
        alive = valid & (trans >= early_stop_eps)
        per_ray2 = torch.zeros(r + 1, dtype=torch.int64, device=dev).index_add_(0, ri, alive.long())[:r]
        fits2, start2 = _whole_rays(per_ray2, target)
        alive &= torch.cat([fits2, fits2.new_zeros(1)])[ri]
        src2, valid2 = _compact(alive, target)                                       # (T,)
        src2c = src2.clamp(max=capacity - 1)
        ri2 = torch.where(valid2, ri[src2c], torch.full_like(src2c, r))
        ts2 = ts[src2c]
        start2_pad = torch.cat([start2, start2.new_zeros(1)])
        n_compacted = valid2.sum()
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        rgbs, sigmas = model.field(positions(ri2, ts2), d_pad[ri2])
    rgbs, sigmas = rgbs.float(), sigmas.float()
    sigmas = torch.where(valid2, sigmas, torch.zeros_like(sigmas))
    tau = sigmas * step
    w = _transmittance(tau, start2_pad[ri2]) * (1.0 - torch.exp(-tau))
    opacity = torch.zeros(r + 1, dtype=w.dtype, device=dev).index_add_(0, ri2, w)[:r]
    color = torch.zeros((r + 1, 3), dtype=rgbs.dtype, device=dev).index_add_(0, ri2, w.unsqueeze(1) * rgbs)[:r]
    bg = background.expand(r, 3) if background.dim() == 1 else background
    ray_mask = fits1 & fits2
    return FixedBatch(color + (1.0 - opacity).unsqueeze(1) * bg, ray_mask, n_marched, n_compacted,
                      ray_mask.sum(), valid.sum())
