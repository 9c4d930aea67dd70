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
is one `embedding_bag` with per-sample weights, and the backward is written by hand (one 1-D
`scatter_add_` per pair of features). Lookups are laid out (level, corner, sample) so the
elementwise work broadcasts over contiguous samples. Positions receive no gradient (NeRF does
not need it). On this repo's 2-core CPU, encoding forward + backward for 8k samples at L=16,
T=2^16 went from ~25 ms to ~16 ms with this layout and backward.
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
    """Table rows (L, 8, N) and trilinear weights (L, 8, N) for positions x (N, 3) in [0, 1].

    Rows are int32 when the table has fewer than 2^31 rows (half the memory traffic of int64;
    `embedding_bag` takes them as they are, the backward widens them once), else int64.

    Corner c of a cell has offset ((c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1). The sample index
    is innermost so every broadcast runs over contiguous rows of N (with a corner or feature axis
    innermost, the same arithmetic was ~3× slower on CPU). Dense levels add a per-level corner
    offset (dx + dy·res + dz·res²) to each cell's base index; the index is wrapped modulo the
    level size as tiny-cuda-nn does (it is < 2·size, so one conditional subtraction is exact).
    For hashed levels the masking to the table size and the level's row offset (a multiple of
    the table size) are folded into the per-axis terms, so the full-size work is two XORs:
    ((a ⊕ b ⊕ c) mod T) + off == (a mod T) ⊕ (b mod T) ⊕ ((c mod T) | off).
    """
    nd = buffers["n_dense"]
    n_dense = nd if isinstance(nd, int) else int(nd)                # the module passes an int: no device read
    scale64 = buffers["scale"].to(torch.float64)                      # (L,) float32 values
    L, N = scale64.shape[0], x.shape[0]
    dev = x.device
    xt = x.to(torch.float32).clamp(0.0, 1.0).T.to(torch.float64)      # positions are float32, as in tcnn
    # fmaf(scale, x, 0.5): the float32 product is exact in float64, the sum is rounded once.
    half = torch.full((1, 1, 1), 0.5, dtype=torch.float64, device=dev)
    pos = torch.addcmul(half, xt.unsqueeze(1), scale64.view(1, L, 1)).to(torch.float32)   # (3, L, N)
    # pos >= 0.5, so truncation is floor and frac() is pos - floor(pos) (exact in float32); the
    # (1 - f, f) pairs are written in place rather than stacked (one pass fewer over 3·L·N).
    w2 = torch.empty((3, L, 2, N), dtype=weight_dtype, device=dev)
    frac = w2[:, :, 1]
    if weight_dtype == torch.float32:
        torch.frac(pos, out=frac)
    else:
        frac.copy_(torch.frac(pos))
    torch.sub(torch.ones((), dtype=weight_dtype, device=dev), frac, out=w2[:, :, 0])
    cell = pos.to(torch.int32)
    idt = buffers["offset"].dtype                                       # int32 unless the table needs 64 bits
    rows = torch.empty((L, 8, N), dtype=idt, device=dev)               # written in place, no cat
    if n_dense > 0:
        c = cell[:, :n_dense].to(idt)
        res = buffers["resolution"][:n_dense].view(-1, 1).to(idt)
        base = c[0] + c[1] * res + c[2] * (res * res)                                  # (D, N)
        off = buffers["offset"][:n_dense].view(-1, 1, 1)
        size = buffers["n_params"][:n_dense].view(-1, 1, 1).to(idt)
        # the level's row offset is folded into the corner offsets; the wrap compares with offset + size
        idx = base.unsqueeze(1) + (buffers["dense_corner_offset"] + off)                # (D, 8, N)
        torch.where(idx >= size + off, idx - size, idx, out=rows[:n_dense])
    if n_dense < L:
        m = L - n_dense
        c = cell[:, n_dense:]
        c2 = torch.empty((3, m, 2, N), dtype=torch.int32, device=dev)                 # (cell, cell + 1)
        c2[:, :, 0] = c
        torch.add(c, 1, out=c2[:, :, 1])
        mask = (buffers["n_params"][n_dense:] - 1).view(-1, 1, 1)
        hx = (c2[0] & mask).to(idt)                                                     # prime 1
        hy = c2[1].mul_(_PRIMES_I32[1]).bitwise_and_(mask).to(idt)                     # uint32 bits, low part
        hz = c2[2].mul_(_PRIMES_I32[2]).bitwise_and_(mask).to(idt)
        hz = hz.bitwise_or_(buffers["offset"][n_dense:].view(-1, 1, 1))
        hzy = (hz.view(m, 2, 1, N) ^ hy.view(m, 1, 2, N)).view(m, 4, 1, N)              # (z, y)
        torch.bitwise_xor(hzy, hx.view(m, 1, 2, N), out=rows[n_dense:].view(m, 4, 2, N))
    wyx = (w2[1].view(L, 2, 1, N) * w2[0].view(L, 1, 2, N)).view(L, 1, 4, N)
    weights = (w2[2].view(L, 2, 1, N) * wyx).view(L, 8, N)
    return rows, weights


class _GatherBlend(torch.autograd.Function):
    """out[n, l·F:(l+1)·F] = Σ_c w[l, c, n] · table[rows[l, c, n]]; rows, w (L, 8, N).

    Forward: one `embedding_bag` with per-sample weights. Backward by hand: the gradient of
    each table row is a scatter-add of w·g over the (L·8·N) lookups; on CPU with F even, pairs
    of features travel as one complex number, so a single 1-D `scatter_add_` does the work
    (embedding_bag's own backward, and `index_add_` on (P, F) rows, were 2-10× slower here).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        L, C, N = rows.shape
        F_ = table.shape[1]
        # a detached table takes embedding_bag's forward-only path (no offset2bag/bag_size bookkeeping)
        out = torch.nn.functional.embedding_bag(rows.transpose(1, 2).reshape(L * N, C), table.detach(), mode="sum",
                                                per_sample_weights=weights.to(table.dtype).transpose(1, 2)
                                                .reshape(L * N, C))
        ctx.save_for_backward(rows, weights)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        return out.view(L, N, F_).permute(1, 0, 2).reshape(N, L * F_)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        rows, weights = ctx.saved_tensors
        L, C, N = rows.shape
        P, F_ = ctx.table_shape
        g = grad_out.reshape(N, L, F_).permute(1, 0, 2)                                # (L, N, F)
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        flat = rows.reshape(-1).to(torch.int64)                                        # scatter_add_ wants int64
        pairs = F_ % 2 == 0 and g.device.type == "cpu"                                 # complex scatter: CPU-tested
        chans = torch.view_as_complex(g.contiguous().view(L, N, F_ // 2, 2)) if pairs else g   # (L, N, K)
        # The weights are converted once to the channels' dtype (complex on CPU): a float × complex
        # product would cast element by element on TensorIterator's slow mixed-dtype path.
        w = weights.to(chans.dtype)
        grad = torch.zeros((chans.shape[2], P), dtype=chans.dtype, device=g.device)          # (K, P)
        owned = w.dtype != weights.dtype                    # a fresh copy: the last channel reuses it in place
        K = chans.shape[2]
        for k in range(K):
            gk = chans[:, :, k].unsqueeze(1)
            src = w.mul_(gk) if owned and k == K - 1 else w * gk
            grad[k].scatter_add_(0, flat, src.reshape(-1))
        grad = grad.T.contiguous()                                                         # (P, K)
        grad_table = (torch.view_as_real(grad) if pairs else grad).reshape(P, F_)
        grad_table = grad_table.to(ctx.table_dtype)
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
        index_dtype = torch.int32 if n_rows < (1 << 31) else torch.int64
        self.register_buffer("offset", torch.tensor([lv.offset for lv in self.levels], dtype=index_dtype), False)
        self.register_buffer("dense", torch.tensor([lv.dense for lv in self.levels]), False)
        n_dense = sum(lv.dense for lv in self.levels)
        if any(lv.dense for lv in self.levels[n_dense:]):
            raise ValueError("dense levels must come first")
        self.register_buffer("n_dense", torch.tensor(n_dense), False)
        self._n_dense = int(n_dense)          # host copy: reading the buffer would sync CUDA every forward
        c = torch.arange(8)
        res = torch.tensor([lv.resolution for lv in self.levels[:n_dense]], dtype=torch.int64).view(-1, 1)
        self.register_buffer("dense_corner_offset",                 # (D, 8, 1): dx + dy·res + dz·res²
                             ((c & 1) + ((c >> 1) & 1) * res + ((c >> 2) & 1) * res * res).unsqueeze(-1)
                             .to(index_dtype), False)
        for lv in self.levels[n_dense:]:
            if lv.n_params & (lv.n_params - 1):
                raise ValueError("hashed levels need a power-of-two table size")

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def _buffers_dict(self) -> dict[str, torch.Tensor]:
        d = {k: getattr(self, k) for k in ("scale", "resolution", "n_params", "offset", "dense",
                                           "dense_corner_offset")}
        return {**d, "n_dense": self._n_dense}

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows and trilinear weights, both (L, 8, N)."""
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
