"""Occupancy grid over the unit cube, maintained as instant-ngp does.

Each cell stores an optical thickness (density × minimum step size). An update evaluates the
density at one random point in each chosen cell, decays the stored value by 0.95 and keeps the
maximum: `value = max(value · decay, new)`. All cells are updated for the first 256 steps, then a
quarter of the cells chosen uniformly plus a quarter chosen among the occupied ones (both
configurable: on CPU the full pass is costly, see defaults.py). A cell is
occupied when its value exceeds min(threshold, mean). A grid with no occupied cell (at the start,
or after a collapse) is treated as fully occupied so training can recover.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DensityFn = Callable[[torch.Tensor], torch.Tensor]   # positions (N, 3) in [0, 1]³ → sigma (N,)


def update_interval(step: int) -> int:
    """Steps between grid updates: min(16, max(1, step / 16)), as instant-ngp."""
    return min(16, max(1, step // 16))


def should_update(step: int, every: int | None) -> bool:
    """instant-ngp's schedule when `every` is None, else every `every` steps (and at step 0)."""
    return step % (update_interval(step) if every is None else every) == 0


class OccupancyGrid(nn.Module):
    """resolution³ cells over [0, 1]³; state in buffers so it is saved with the model."""

    def __init__(self, resolution: int = 128, *, decay: float = 0.95, threshold: float = 0.01,
                 min_step_size: float = 3 ** 0.5 / 1024, warmup_steps: int = 256,
                 sample_fraction: float = 0.25) -> None:
        super().__init__()
        self.resolution = int(resolution)
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.min_step_size = float(min_step_size)
        self.warmup_steps = int(warmup_steps)
        self.sample_fraction = float(sample_fraction)
        n = self.resolution ** 3
        self.register_buffer("values", torch.zeros(n))
        self.register_buffer("occupied", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))
        self._summary_key: tuple[int, int] | None = None
        self.sync_free = False            # set by the trainer on the CUDA path: update() reads nothing back
        self._summary: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def n_cells(self) -> int:
        return self.resolution ** 3

    def cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat cell index (N,) int64 of positions x (N, 3) in [0, 1]³ (x-fastest)."""
        r = self.resolution
        c = (x * r).long().clamp_(0, r - 1)
        return c[:, 0] + c[:, 1] * r + c[:, 2] * (r * r)

    def _cell_coords(self, idx: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        return torch.stack([idx % r, (idx // r) % r, idx // (r * r)], dim=-1)

    def _occupancy_summary(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(any cell occupied (0-d bool), box lo, box hi, flags or all-True), recomputed only when
        `occupied` changed (its version counter moves on every in-place write: an update, a
        loaded state dict). All stay on the device: nothing here synchronises CUDA."""
        key = (self.occupied._version, self.occupied.data_ptr())
        if self._summary is None or self._summary_key != key:
            self._summary = self._compute_summary()
            self._summary_key = key
        return self._summary

    def _compute_summary(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.resolution
        occ = self.occupied.view(r, r, r)                                          # (z, y, x)
        any_occ = occ.any()
        lo, hi = [], []
        for dims in ((0, 1), (0, 2), (1, 2)):          # reduce to x, y, z in turn
            line = occ.any(dim=dims[0]).any(dim=dims[1] - 1).to(torch.uint8)
            lo.append(torch.argmax(line))                               # first occupied index
            hi.append(r - torch.argmax(line.flip(0)))                   # one past the last
        lo_t, hi_t = torch.stack(lo).float() / r, torch.stack(hi).float() / r
        lo_t = torch.where(any_occ, lo_t, torch.zeros_like(lo_t))       # none occupied: the unit cube
        hi_t = torch.where(any_occ, hi_t, torch.ones_like(hi_t))
        return any_occ, lo_t, hi_t, occ | ~any_occ

    def flags(self) -> torch.Tensor | None:
        """The occupied flags as a (res, res, res) grid indexed [z, y, x]; None when no cell is
        occupied (then everything counts as occupied), as `lookup` treats it. Reads one flag
        back to the host; `flags_or_all` does not."""
        if not bool(self._occupancy_summary()[0]):
            return None
        return self.occupied.view(self.resolution, self.resolution, self.resolution)

    def flags_or_all(self) -> torch.Tensor:
        """The flags grid, all True when no cell is occupied; no host synchronisation."""
        return self._occupancy_summary()[3]

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """Occupied flags (N,) for positions (N, 3); everything is occupied when no cell is."""
        return self.flags_or_all().reshape(-1)[self.cell_index(x)]

    @torch.no_grad()
    def update(self, step: int, density_fn: DensityFn, *, chunk: int = 65536,
               generator: torch.Generator | None = None) -> None:
        """One update at training step `step` (call it when `step % update_interval(step) == 0`)."""
        dev = self.values.device
        n = self.n_cells
        if step < self.warmup_steps:
            cells = torch.arange(n, device=dev)
        else:
            k = max(1, int(n * self.sample_fraction))
            uniform = torch.randint(0, n, (k,), device=dev, generator=generator)
            if self.sync_free:
                # k occupied cells drawn uniformly by inverting the running count (no nonzero(),
                # whose output size would be read back to the host); none occupied: uniform ones.
                count = torch.cumsum(self.occupied.to(torch.int32), 0)
                u = (torch.rand(k, device=dev, generator=generator) * count[-1]).long()
                pick = torch.searchsorted(count, u, right=True).clamp_(max=n - 1)
                other = torch.randint(0, n, (k,), device=dev, generator=generator)
                cells = torch.cat([uniform, torch.where(count[-1] > 0, pick, other)])
            else:
                # the same draw with nonzero(): ~4x cheaper on CPU, where reading a size is free
                occ = torch.nonzero(self.occupied).squeeze(1)
                if occ.numel() > 0:
                    pick = torch.randint(0, occ.numel(), (k,), device=dev, generator=generator)
                    cells = torch.cat([uniform, occ[pick]])
                else:
                    cells = uniform
        new = torch.zeros(n, device=dev)
        for s in range(0, cells.numel(), chunk):
            c = cells[s:s + chunk]
            jitter = torch.rand((c.numel(), 3), device=dev, generator=generator)
            x = (self._cell_coords(c).float() + jitter) / self.resolution
            sigma = density_fn(x).float() * self.min_step_size
            new.scatter_reduce_(0, c, sigma, reduce="amax")
        self.values.copy_(torch.maximum(self.values * self.decay, new))
        thr = self.values.mean().clamp(max=self.threshold)
        self.occupied.copy_(self.values > thr)
        self.n_updates += 1

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned box (lo (3,), hi (3,)) around the occupied cells; the unit cube when none is."""
        _, lo, hi, _ = self._occupancy_summary()
        return lo, hi

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())
