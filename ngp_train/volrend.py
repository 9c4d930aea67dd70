"""Ray–box intersection, ray marching and volume rendering over flat samples.

Nothing here knows the network: marching takes an occupancy callback and rendering takes
callbacks that return densities (and colours) for samples. Samples are stored flat and sorted by
ray: `ray_indices (S,)` int64, `t_starts (S,)`, `t_ends (S,)`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SigmaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (t_starts (S,), t_ends (S,), ray_indices (S,)) -> sigmas (S,)
RgbSigmaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
# (t_starts, t_ends, ray_indices) -> (rgbs (S, 3), sigmas (S,))
OccupiedFn = Callable[[torch.Tensor], torch.Tensor]   # positions (M, 3) -> bool (M,)


@dataclass(frozen=True, slots=True)
class Samples:
    ray_indices: torch.Tensor   # (S,) int64, non-decreasing
    t_starts: torch.Tensor      # (S,)
    t_ends: torch.Tensor        # (S,)

    @property
    def n(self) -> int:
        return int(self.ray_indices.numel())


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, lo: float = 0.0, hi: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test. origins, dirs (R, 3) → t_near (R,) ≥ 0, t_far (R,), hit (R,) bool."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    inv = 1.0 / safe
    t0, t1 = (lo - origins) * inv, (hi - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far, t_far > t_near


def march(origins: torch.Tensor, dirs: torch.Tensor, step_size: float, occupied_fn: OccupiedFn | None = None,
          *, jitter: torch.Tensor | None = None, max_steps: int | None = None,
          box: tuple[float | torch.Tensor, float | torch.Tensor] = (0.0, 1.0),
          occupancy: torch.Tensor | None = None) -> Samples:
    """Fixed-step marching through `box` (default the unit cube), keeping samples whose midpoint
    is occupied.

    origins, dirs: (R, 3) in unit-cube coordinates, dirs unit length. Steps are laid on the grid
    t = k·step_size (+ jitter·step_size) so a tighter box only skips empty steps. jitter (R,) in
    [0, 1) shifts each ray's samples (training); None: no shift. `occupancy`, a bool grid
    (res, res, res) indexed [z, y, x] over the unit cube, may be given instead of `occupied_fn`
    (same result, faster). Returns flat samples.
    """
    r = origins.shape[0]
    dev = origins.device
    t_near, t_far, hit = ray_aabb(origins, dirs, box[0], box[1])
    if r == 0 or not bool(hit.any()):
        empty = torch.zeros(0, device=dev)
        return Samples(torch.zeros(0, dtype=torch.int64, device=dev), empty, empty)
    n_steps = torch.ceil((t_far - t_near) / step_size).clamp(min=0).long() + 1
    n_steps = torch.where(hit, n_steps, torch.zeros_like(n_steps))
    k_max = int(n_steps.max())
    if max_steps is not None:
        k_max = min(k_max, max_steps)
    if occupied_fn is not None:
        t0, keep = candidates(origins, dirs, step_size, k_max, jitter=jitter, box=box, t_near=t_near, t_far=t_far,
                              hit=hit)
        mid = t0 + 0.5 * step_size
        rr, kk = torch.nonzero(keep, as_tuple=True)
        pts = origins[rr] + dirs[rr] * mid[rr, kk].unsqueeze(1)
        occ = occupied_fn(pts.clamp(0.0, 1.0))
        rr, kk = rr[occ], kk[occ]
    else:
        t0, keep = candidates(origins, dirs, step_size, k_max, jitter=jitter, box=box, occupancy=occupancy,
                              t_near=t_near, t_far=t_far, hit=hit)
        # flat positions of the kept steps: one gather of t0 by index_select (t0[rr, kk] takes
        # advanced indexing's slower general path); row-major, so still sorted by ray
        flat = torch.nonzero(keep.view(-1)).squeeze(1)
        ts = t0.reshape(-1).index_select(0, flat)
        rr = torch.div(flat, k_max, rounding_mode="floor")
        return Samples(rr, ts, ts + step_size)
    ts = t0[rr, kk]
    return Samples(rr, ts, ts + step_size)


def candidates(origins: torch.Tensor, dirs: torch.Tensor, step_size: float, k_max: int, *,
               jitter: torch.Tensor | None = None,
               box: tuple[float | torch.Tensor, float | torch.Tensor] = (0.0, 1.0),
               occupancy: torch.Tensor | None = None, t_near: torch.Tensor | None = None,
               t_far: torch.Tensor | None = None, hit: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense marching layout: step starts t0 (R, k_max) and keep (R, k_max) for the steps
    inside `box` whose midpoint is occupied. Reads nothing back to the host, so with a fixed
    `k_max` it runs without a device synchronisation (the CUDA training path)."""
    dev = origins.device
    if t_near is None or t_far is None or hit is None:
        t_near, t_far, hit = ray_aabb(origins, dirs, box[0], box[1])
    shift = 0.0 if jitter is None else jitter * step_size
    start = torch.floor((t_near - shift) / step_size) * step_size + shift          # first step at or before t_near
    t0 = start.unsqueeze(1) + torch.arange(k_max, device=dev, dtype=origins.dtype) * step_size   # (R, K)
    keep = (t0 < t_far.unsqueeze(1)) & (t0 + step_size > t_near.unsqueeze(1))
    keep &= hit.unsqueeze(1)
    if occupancy is not None:
        mid = t0 + 0.5 * step_size                                                      # (R, K)
        # The same test on the (R, K) layout: per-axis broadcasts instead of gathering an
        # (S, 3) point list (about 3x faster for ~10^5 candidates on CPU). The cell arithmetic
        # is in place and int32 (res³ is far below 2^31): half the bytes of int64 per pass.
        res = occupancy.shape[0]

        def cell(a: int) -> torch.Tensor:
            p = (origins[:, a:a + 1] + dirs[:, a:a + 1] * mid).clamp_(0.0, 1.0).mul_(res)
            return p.to(torch.int32).clamp_(max=res - 1)                # p >= 0: truncation is floor

        flat = cell(0)
        for a in (1, 2):
            flat.add_(cell(a).mul_(res ** a))
        # index_select, not flags[flat]: the same gather without advanced indexing's
        # general machinery (several times cheaper on CPU for ~10^5 int32 indices)
        keep &= occupancy.reshape(-1).index_select(0, flat.view(-1)).view_as(flat)
    return t0, keep


def _ray_starts(ray_indices: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(ray_indices, minlength=n_rays)
    return torch.cumsum(counts, 0) - counts, counts


def transmittance(sigmas: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                  ray_indices: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample transmittance before the sample T_i = exp(−Σ_{j<i} σ_j δ_j) and alpha
    α_i = 1 − exp(−σ_i δ_i), both (S,). Sums run within each ray (samples sorted by ray)."""
    tau = sigmas * (t_ends - t_starts)
    cs = torch.cumsum(tau.double(), 0)
    excl = cs - tau.double()
    starts, counts = _ray_starts(ray_indices, n_rays)
    base = torch.zeros(n_rays, dtype=excl.dtype, device=excl.device)
    has = counts > 0
    base[has] = excl[starts[has]]
    trans = torch.exp(-(excl - base.index_select(0, ray_indices))).to(sigmas.dtype)
    alpha = 1.0 - torch.exp(-tau)
    return trans, alpha


def render_weights(sigmas: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                   ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Volume-rendering weights w_i = T_i · α_i, (S,)."""
    trans, alpha = transmittance(sigmas, t_starts, t_ends, ray_indices, n_rays)
    return trans * alpha


def accumulate(weights: torch.Tensor, values: torch.Tensor | None, ray_indices: torch.Tensor,
               n_rays: int) -> torch.Tensor:
    """Σ_i w_i · v_i per ray: values (S, C) → (n_rays, C); values None → Σ w_i, (n_rays,)."""
    if values is None:
        return torch.zeros(n_rays, dtype=weights.dtype, device=weights.device).index_add_(0, ray_indices, weights)
    out = torch.zeros((n_rays, values.shape[1]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, ray_indices, weights.unsqueeze(1).to(values.dtype) * values)


@dataclass(frozen=True, slots=True)
class RenderOutput:
    rgb: torch.Tensor          # (R, 3), composited on the background
    opacity: torch.Tensor      # (R,)
    depth: torch.Tensor        # (R,), expected t of the opaque part
    n_samples: int             # samples that reached the colour network
    n_marched: int | None = None   # samples the marcher produced, before a sample budget cut rays


def volume_render(samples: Samples, n_rays: int, rgb_sigma_fn: RgbSigmaFn, *, background: torch.Tensor,
                  sigma_fn: SigmaFn | None = None, early_stop_eps: float = 1e-4) -> RenderOutput:
    """Render rays from flat samples.

    If `sigma_fn` is given, densities are first computed without gradients and samples behind the
    point where transmittance drops below `early_stop_eps` are dropped (early termination), so
    `rgb_sigma_fn` runs only on samples that contribute. background: (3,) or (R, 3).
    """
    ri, ts, te = samples.ray_indices, samples.t_starts, samples.t_ends
    if sigma_fn is not None and samples.n > 0:
        with torch.no_grad():
            trans, _ = transmittance(sigma_fn(ts, te, ri), ts, te, ri, n_rays)
            alive = trans >= early_stop_eps
        ri, ts, te = ri[alive], ts[alive], te[alive]
    bg = background.expand(n_rays, 3) if background.dim() == 1 else background
    if ri.numel() == 0:
        zeros = torch.zeros(n_rays, device=bg.device)
        return RenderOutput(bg.clone(), zeros, zeros, 0)
    rgbs, sigmas = rgb_sigma_fn(ts, te, ri)
    w = render_weights(sigmas, ts, te, ri, n_rays)
    opacity = accumulate(w, None, ri, n_rays)
    rgb = accumulate(w, rgbs, ri, n_rays) + (1.0 - opacity).unsqueeze(1) * bg
    depth = accumulate(w, (0.5 * (ts + te)).unsqueeze(1), ri, n_rays).squeeze(1)
    return RenderOutput(rgb, opacity, depth, int(ri.numel()))
