"""Hash grid, SH and field: values against tiny-cuda-nn's rules and an independent NumPy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ngp_train.encoding import HashGridConfig, HashGridEncoding, level_layout, spherical_harmonics_deg4
from ngp_train.field import FieldConfig, NgpField, trunc_exp


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201 - tiny tensors: one thread is as fast, and far faster on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

P1, P2 = 2654435761, 805459861


def test_paper_config_levels_0_to_4_dense_rest_hashed() -> None:
    levels = level_layout(HashGridConfig(n_levels=16, log2_hashmap_size=19, base_resolution=16,
                                         max_resolution=2048))
    assert [lv.dense for lv in levels] == [True] * 5 + [False] * 11
    assert levels[0].scale == 15.0 and levels[0].resolution == 16 and levels[0].n_params == 4096
    assert levels[4].resolution == 59 and levels[4].n_params == 59 ** 3 + (-59 ** 3) % 8
    assert levels[5].resolution == 81 and levels[5].n_params == 1 << 19
    # per-level scale b = exp(ln(2048/16)/15); the finest level's scale is 2048·(1) − 1 up to float32
    assert abs(levels[-1].scale - 2047.0) < 0.05
    # hashed slices start at multiples of the table size
    assert all(lv.offset % (1 << 19) == 0 for lv in levels if not lv.dense)


def _table(enc: HashGridEncoding) -> np.ndarray:
    return enc.table.detach().numpy().astype(np.float64)


def test_exact_at_dense_grid_vertices() -> None:
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, log2_hashmap_size=16, base_resolution=17,
                         max_resolution=17)
    enc = HashGridEncoding(cfg, seed=1)
    assert enc.levels[0].dense and enc.levels[0].scale == 16.0
    k = torch.tensor([[1, 1, 1], [3, 5, 7], [16, 1, 9], [16, 16, 16]])
    x = ((k.double() - 0.5) / 16.0).float()              # pos = x·16 + 0.5 = k exactly
    out = enc(x).detach()
    rows = (k[:, 0] + k[:, 1] * 17 + k[:, 2] * 17 * 17) % enc.levels[0].n_params
    assert torch.equal(out, enc.table.detach()[rows])


def test_exact_at_hashed_grid_vertices() -> None:
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, log2_hashmap_size=8, base_resolution=17,
                         max_resolution=17)
    enc = HashGridEncoding(cfg, seed=2)
    assert not enc.levels[0].dense
    k = [(1, 2, 3), (16, 9, 4), (5, 15, 11)]
    x = torch.tensor([[(c - 0.5) / 16.0 for c in kk] for kk in k], dtype=torch.float32)
    out = enc(x).detach()
    for n, (a, b, c) in enumerate(k):
        row = ((a * 1) ^ ((b * P1) & 0xFFFFFFFF) ^ ((c * P2) & 0xFFFFFFFF)) % 256
        assert torch.equal(out[n], enc.table.detach()[row])


def numpy_reference(x: np.ndarray, enc: HashGridEncoding) -> np.ndarray:
    """Loops over levels and corners, Python-int hashing: an independent reading of the rules."""
    table = _table(enc)
    F = enc.cfg.n_features_per_level
    out = np.zeros((x.shape[0], len(enc.levels) * F))
    for li, lv in enumerate(enc.levels):
        scale = np.float32(lv.scale)
        for n in range(x.shape[0]):
            # tiny-cuda-nn: fmaf(scale, x, 0.5), one rounding of the exact value to float32
            pos = [np.float32(float(np.float32(v)) * float(scale) + 0.5) for v in x[n]]
            cell = [int(math.floor(p)) for p in pos]
            frac = [float(p - math.floor(p)) for p in pos]
            acc = np.zeros(F)
            for corner in range(8):
                c = [cell[d] + ((corner >> d) & 1) for d in range(3)]
                w = 1.0
                for d in range(3):
                    w *= frac[d] if (corner >> d) & 1 else 1.0 - frac[d]
                if lv.dense:
                    idx = (c[0] + c[1] * lv.resolution + c[2] * lv.resolution ** 2) % lv.n_params
                else:
                    idx = ((c[0]) ^ ((c[1] * P1) & 0xFFFFFFFF) ^ ((c[2] * P2) & 0xFFFFFFFF)) % lv.n_params
                acc += w * table[lv.offset + idx]
            out[n, li * F:(li + 1) * F] = acc
    return out


@pytest.mark.parametrize("dtype,table_range", [(torch.float32, None), (torch.float64, 1.0)])
def test_matches_bruteforce_numpy_reference(dtype: torch.dtype, table_range: float | None) -> None:
    cfg = HashGridConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                         max_resolution=300)
    enc = HashGridEncoding(cfg, dtype=dtype, seed=3)
    if table_range is not None:                             # larger values make indexing errors visible
        with torch.no_grad():
            enc.table.uniform_(-table_range, table_range)
    levels = enc.levels
    assert any(lv.dense for lv in levels) and any(not lv.dense for lv in levels)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random((40, 3)), np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.999999, 0.5, 0.0]])])
    x = x.astype(np.float32)
    ours = enc(torch.from_numpy(x)).detach().numpy()
    ref = numpy_reference(x, enc)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_gradcheck_float64() -> None:
    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2,
                         max_resolution=12)
    enc = HashGridEncoding(cfg, dtype=torch.float64, seed=4)
    x = torch.rand(12, 3, dtype=torch.float64)
    rows, w = enc.corners(x)
    from ngp_train.encoding import _GatherBlend

    table = enc.table.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _GatherBlend.apply(t, rows, w), (table,), eps=1e-6, atol=1e-8)


def test_trilinear_weights_sum_to_one_and_init_range() -> None:
    enc = HashGridEncoding(HashGridConfig(log2_hashmap_size=14, max_resolution=256), seed=5)
    _, w = enc.corners(torch.rand(100, 3))
    torch.testing.assert_close(w.sum(1), torch.ones(16, 100), atol=1e-6, rtol=0)
    t = enc.table.detach()
    assert float(t.abs().max()) <= 1e-4 and float(t.std()) > 3e-5    # uniform ±1e-4


def test_spherical_harmonics_orthonormal() -> None:
    # Monte-Carlo ∫ Y_i Y_j dΩ = δ_ij over the sphere (4π · mean over uniform directions).
    g = torch.Generator().manual_seed(0)
    d = torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    y = spherical_harmonics_deg4(d)
    gram = 4 * math.pi * (y.T @ y) / d.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.02, rtol=0)
    assert float(y[0, 0]) == pytest.approx(0.28209479177387814)


def test_trunc_exp_gradient_is_clamped() -> None:
    x = torch.tensor([0.0, 2.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.exp(x.detach()))
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([0.0, 2.0, 15.0])))


def test_field_architecture_matches_paper() -> None:
    f = NgpField(FieldConfig(grid=HashGridConfig(log2_hashmap_size=12)), seed=0)
    dens = [m for m in f.density_net if isinstance(m, torch.nn.Linear)]
    col = [m for m in f.color_net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dens] == [(32, 64), (64, 16)]
    assert [(m.in_features, m.out_features) for m in col] == [(32, 64), (64, 64), (64, 3)]
    rgb, sigma = f(torch.rand(7, 3), torch.nn.functional.normalize(torch.randn(7, 3), dim=-1))
    assert rgb.min() > 0 and rgb.max() < 1 and bool((sigma > 0).all())


@pytest.mark.parametrize("features", [1, 2, 4])
def test_hand_written_backward_equals_autograd_of_plain_gather(features: int) -> None:
    # The backward scatters w·g per lookup (pairs of features as complex numbers when F is even);
    # autograd through a plain index-and-sum must give the same table gradient.
    cfg = HashGridConfig(n_levels=6, n_features_per_level=features, log2_hashmap_size=10, base_resolution=4,
                         max_resolution=64)
    enc = HashGridEncoding(cfg, seed=7)
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(3))
    g = torch.randn(300, cfg.out_dim, generator=torch.Generator().manual_seed(4))
    (enc(x) * g).sum().backward()
    rows, w = enc.corners(x)                                                   # (L, 8, N)
    table = enc.table.detach().clone().requires_grad_(True)
    ref = (table[rows] * w.unsqueeze(-1)).sum(1)                               # (L, N, F)
    (ref.permute(1, 0, 2).reshape(300, -1) * g).sum().backward()
    assert float(table.grad.abs().max()) > 0
    torch.testing.assert_close(enc.table.grad, table.grad, atol=1e-6, rtol=1e-5)


def loop_corners(x: torch.Tensor, enc: HashGridEncoding, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights (L, 8, N) level by level and corner by corner in int64, with floor and
    explicit products: the plain reading that the batched corner_indices must equal exactly."""
    rows, weights = [], []
    x32 = x.to(torch.float32).clamp(0.0, 1.0)
    for lv in enc.levels:
        pos = (x32.double() * float(np.float32(lv.scale)) + 0.5).float()             # fmaf: one rounding
        cell = torch.floor(pos).long()
        frac = (pos - torch.floor(pos)).to(dtype)
        r_l, w_l = [], []
        for corner in range(8):
            bits = [(corner >> d) & 1 for d in range(3)]
            c = [cell[:, d] + bits[d] for d in range(3)]
            if lv.dense:
                idx = (c[0] + c[1] * lv.resolution + c[2] * lv.resolution ** 2) % lv.n_params
            else:
                idx = (c[0] ^ ((c[1] * P1) & 0xFFFFFFFF) ^ ((c[2] * P2) & 0xFFFFFFFF)) % lv.n_params
            w = torch.ones(x.shape[0], dtype=dtype)
            for d in (1, 0, 2):                                                        # the product order used
                w = w * (frac[:, d] if bits[d] else 1 - frac[:, d])
            r_l.append(idx + lv.offset)
            w_l.append(w)
        rows.append(torch.stack(r_l))
        weights.append(torch.stack(w_l))
    return torch.stack(rows), torch.stack(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_corner_indices_equal_the_per_level_loop(dtype: torch.dtype) -> None:
    # corner_indices computes all levels in a few broadcast int32 passes (frac() and truncation,
    # pairs written in place, offsets folded into the hash); it must pick the same rows and the
    # same trilinear weights as the obvious loop, including at the cube's faces (dense wrap).
    enc = HashGridEncoding(HashGridConfig(log2_hashmap_size=12, base_resolution=4, max_resolution=300),
                           dtype=dtype, seed=1)
    assert any(lv.dense for lv in enc.levels) and any(not lv.dense for lv in enc.levels)
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.rand(3000, 3, generator=g), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0],
                                                                   [1.0, 0.0, 0.5], [0.999999, 1e-7, 1.0]])])
    rows, w = enc.corners(x)
    ref_rows, ref_w = loop_corners(x, enc, dtype)
    assert rows.dtype == torch.int32 and w.dtype == dtype
    assert torch.equal(rows.long(), ref_rows)
    assert torch.equal(w, ref_w)                            # same products in the same order: bit for bit
