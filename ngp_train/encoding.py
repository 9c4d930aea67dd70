"""Multiresolution hash encoding (tiny-cuda-nn semantics) and spherical harmonics, in PyTorch.

Hash grid, level l of L (tiny-cuda-nn `GridEncodingTemplated`):
    scale_l      = 2^(l · log2 b) · N_min − 1            (float32)
    resolution_l = ceil(scale_l) + 1
    params_l     = min(next_multiple(resolution_l³, 8), T)
    pos          = fmaf(x, scale_l, 0.5) (float32);  cell = floor(pos);  frac = pos − cell
    index        = dense x + y·res + z·res²  when res³ ≤ params_l, else
                   x·1 ⊕ y·2654435761 ⊕ z·805459861 (uint32), then mod params_l
Features of the 8 corners are blended trilinearly; table initialised uniform in ±1e-4.

The table is stored level-major (one (Σ params_l, F) tensor, level l in its own slice), indices
use 32-bit wrapped arithmetic (the same low bits as tiny-cuda-nn's uint32), the gather-and-blend
is one `embedding_bag` with per-sample weights, and the backward is written by hand
(`index_add_` with int64 indices). Positions receive no gradient (NeRF does not need it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)
_PRIMES_I32 = tuple(p - (1 << 32) if p >= (1 << 31) else p for p in PRIMES)   # same bits as uint32


@dataclass(frozen=True, slots=True)
class HashGridConfig:
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: float = 2048.0

    @property
    def per_level_scale(self) -> float:
        if self.n_levels <= 1:
            return 1.0
        return math.exp(math.log(self.max_resolution / self.base_resolution) / (self.n_levels - 1))

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features_per_level


@dataclass(frozen=True, slots=True)
class Level:
    scale: float          # float32 value, as tiny-cuda-nn computes it
    resolution: int
    n_params: int         # rows of this level's slice of the table
    offset: int           # first row of the slice
    dense: bool


def level_layout(cfg: HashGridConfig) -> tuple[Level, ...]:
    """Per-level scale, resolution, table slice and dense/hashed flag."""
    log2_b = np.log2(np.float32(cfg.per_level_scale))
    max_params = 1 << cfg.log2_hashmap_size
    levels, offset = [], 0
    for lvl in range(cfg.n_levels):
        scale = np.float32(np.exp2(np.float32(lvl) * log2_b) * np.float32(cfg.base_resolution) - np.float32(1.0))
        res = int(math.ceil(float(scale))) + 1
        cells = res ** 3
        n = min(((cells + 7) // 8) * 8, max_params)
        dense = cells <= n
        if not dense and offset % n:
            offset += n - offset % n          # align hashed slices so the offset folds into the hash
        levels.append(Level(float(scale), res, n, offset, dense))
        offset += n
    return tuple(levels)


def corner_indices(x: torch.Tensor, levels: tuple[Level, ...], buffers: dict[str, torch.Tensor],
                   weight_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows (L, N, 8) int64 and trilinear weights (L, N, 8) for positions x (N, 3) in [0, 1].

    Corner c of a cell has offset ((c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1). Work is done per
    axis on contiguous (L, N, 2) tensors and combined by broadcasting into (L, N, 2, 2, 2) =
    (…, z, y, x). For hashed levels the masking to the table size and the level's row offset (a
    multiple of the table size) are folded into the per-axis terms, so the full-size work is two
    XORs: ((a ⊕ b ⊕ c) mod T) + off == (a mod T) ⊕ (b mod T) ⊕ ((c mod T) | off).
    """
    n_dense = int(buffers["n_dense"])
    scale64 = buffers["scale"].view(-1, 1).to(torch.float64)         # (L,1) float32 values
    x = x.to(torch.float32).clamp(0.0, 1.0)                           # positions are float32, as in tcnn
    L, N = scale64.shape[0], x.shape[0]
    cells, fracs = [], []
    for axis in range(3):
        # fmaf(scale, x, 0.5): the float32 product is exact in float64, the sum is rounded once.
        pos = (x[:, axis].to(torch.float64).unsqueeze(0) * scale64 + 0.5).to(torch.float32)
        cell = torch.floor(pos)
        fracs.append((pos - cell).to(weight_dtype))                  # (L,N), exact in float32
        c = cell.to(torch.int32)
        cells.append(torch.stack([c, c + 1], dim=-1))                # (L,N,2) int32
    rows = torch.empty((L, N, 2, 2, 2), dtype=torch.int64, device=x.device)   # written in place, no cat
    if n_dense > 0:
        res = buffers["resolution"][:n_dense].view(-1, 1, 1).to(torch.int64)
        cx, cy, cz = (c[:n_dense].to(torch.int64) for c in cells)
        idx = (cx.view(n_dense, N, 1, 1, 2) + (cy * res).view(n_dense, N, 1, 2, 1)
               + (cz * (res * res)).view(n_dense, N, 2, 1, 1))
        idx = torch.remainder(idx, buffers["n_params"][:n_dense].view(-1, 1, 1, 1, 1).to(torch.int64))
        torch.add(idx, buffers["offset"][:n_dense].view(-1, 1, 1, 1, 1), out=rows[:n_dense])
    if n_dense < L:
        m = L - n_dense
        mask = (buffers["n_params"][n_dense:].view(-1, 1, 1) - 1).to(torch.int64)
        hx = cells[0][n_dense:].to(torch.int64) & mask                               # prime 1
        hy = (cells[1][n_dense:] * _PRIMES_I32[1]).to(torch.int64) & mask            # uint32 bits, low part
        hz = ((cells[2][n_dense:] * _PRIMES_I32[2]).to(torch.int64) & mask) | buffers["offset"][n_dense:].view(-1, 1, 1)
        torch.bitwise_xor(hx.view(m, N, 1, 1, 2) ^ hy.view(m, N, 1, 2, 1), hz.view(m, N, 2, 1, 1), out=rows[n_dense:])
    rows = rows.view(L, N, 8)
    wx, wy, wz = (torch.stack([1 - f, f], dim=-1) for f in fracs)      # (L,N,2)
    weights = (wx.view(L, N, 1, 1, 2) * wy.view(L, N, 1, 2, 1) * wz.view(L, N, 2, 1, 1)).view(L, N, 8)
    return rows, weights


class _GatherBlend(torch.autograd.Function):
    """out[n, l·F:(l+1)·F] = Σ_c w[l, n, c] · table[rows[l, n, c]]; backward by index_add_."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        L, N, C = rows.shape
        F_ = table.shape[1]
        out = torch.nn.functional.embedding_bag(rows.view(-1, C), table, mode="sum",
                                                per_sample_weights=weights.reshape(-1, C).to(table.dtype))
        ctx.save_for_backward(rows, weights)
        ctx.table_shape = table.shape
        return out.view(L, N, F_).permute(1, 0, 2).reshape(N, L * F_)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        rows, weights = ctx.saved_tensors
        L, N, C = rows.shape
        P, F_ = ctx.table_shape
        g = grad_out.reshape(N, L, F_).permute(1, 0, 2)                              # (L,N,F)
        contrib = weights.to(g.dtype).unsqueeze(-1) * g.unsqueeze(2)                 # (L,N,8,F)
        grad_table = torch.zeros((P, F_), dtype=g.dtype, device=g.device)
        grad_table.index_add_(0, rows.reshape(-1), contrib.reshape(-1, F_))
        return grad_table, None, None


class HashGridEncoding(nn.Module):
    """Hash grid in PyTorch. forward(x: (N, 3) in [0, 1]) -> (N, L·F), level-major features."""

    def __init__(self, cfg: HashGridConfig, *, dtype: torch.dtype = torch.float32, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = level_layout(cfg)
        n_rows = self.levels[-1].offset + self.levels[-1].n_params
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        table = (torch.rand((n_rows, cfg.n_features_per_level), generator=gen, dtype=torch.float64) * 2 - 1) * 1e-4
        self.table = nn.Parameter(table.to(dtype))
        self.register_buffer("scale", torch.tensor([lv.scale for lv in self.levels], dtype=torch.float32), False)
        self.register_buffer("resolution", torch.tensor([lv.resolution for lv in self.levels], dtype=torch.int32), False)
        self.register_buffer("n_params", torch.tensor([lv.n_params for lv in self.levels], dtype=torch.int32), False)
        self.register_buffer("offset", torch.tensor([lv.offset for lv in self.levels], dtype=torch.int64), False)
        self.register_buffer("dense", torch.tensor([lv.dense for lv in self.levels]), False)
        n_dense = sum(lv.dense for lv in self.levels)
        if any(lv.dense for lv in self.levels[n_dense:]):
            raise ValueError("dense levels must come first")
        self.register_buffer("n_dense", torch.tensor(n_dense), False)
        for lv in self.levels[n_dense:]:
            if lv.n_params & (lv.n_params - 1):
                raise ValueError("hashed levels need a power-of-two table size")

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def _buffers_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("scale", "resolution", "n_params", "offset", "dense", "n_dense")}

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows and trilinear weights, both (L, N, 8)."""
        return corner_indices(x, self.levels, self._buffers_dict(), self.table.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, w = self.corners(x)
        return _GatherBlend.apply(self.table, rows, w)


def spherical_harmonics_deg4(d: torch.Tensor) -> torch.Tensor:
    """Real SH basis up to degree 4 (16 values, tiny-cuda-nn's order and signs) of unit directions (N, 3)."""
    x, y, z = d.unbind(-1)
    xy, xz, yz, x2, y2, z2 = x * y, x * z, y * z, x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * xy,
        -1.0925484305920792 * yz,
        0.94617469575755997 * z2 - 0.31539156525251999,
        -1.0925484305920792 * xz,
        0.54627421529603959 * x2 - 0.54627421529603959 * y2,
        0.59004358992664352 * y * (-3.0 * x2 + y2),
        2.8906114426405538 * xy * z,
        0.45704579946446572 * y * (1.0 - 5.0 * z2),
        0.3731763325901154 * z * (5.0 * z2 - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * z2),
        1.4453057213202769 * z * (x2 - y2),
        0.59004358992664352 * x * (-x2 + 3.0 * y2),
    ], dim=-1)
