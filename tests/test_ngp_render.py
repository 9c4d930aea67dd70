"""Ray marching, occupancy grid and volume rendering against closed-form values."""
from __future__ import annotations

import math

import pytest
import torch

from ngp_train.occupancy import OccupancyGrid, should_update, update_interval
from ngp_train.volrend import Samples, accumulate, march, ray_aabb, render_weights, transmittance, volume_render


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201 - tiny tensors: one thread is as fast, and far faster on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ray_aabb_analytic() -> None:
    o = torch.tensor([[-1.0, 0.5, 0.5], [0.5, 0.5, 0.5], [-1.0, 2.0, 0.5]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_aabb(o, d)
    assert hit.tolist() == [True, True, False]
    torch.testing.assert_close(near[:2], torch.tensor([1.0, 0.0]))       # inside: near clamped to 0
    torch.testing.assert_close(far[:2], torch.tensor([2.0, 0.5]))


def test_constant_density_weights_equal_analytic_transmittance() -> None:
    sigma, dt = 3.0, 0.01
    counts = [100, 37, 1]
    ri = torch.cat([torch.full((c,), r, dtype=torch.int64) for r, c in enumerate(counts)])
    k = torch.cat([torch.arange(c, dtype=torch.float64) for c in counts])
    ts, te = 0.2 + k * dt, 0.2 + (k + 1) * dt
    sig = torch.full_like(ts, sigma)
    w = render_weights(sig, ts, te, ri, len(counts))
    expected = torch.exp(-sigma * k * dt) * (1 - math.exp(-sigma * dt))
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-10)
    trans, alpha = transmittance(sig, ts, te, ri, len(counts))
    torch.testing.assert_close(trans, torch.exp(-sigma * k * dt), atol=1e-12, rtol=1e-10)
    opacity = accumulate(w, None, ri, len(counts))
    torch.testing.assert_close(opacity, torch.tensor([1 - math.exp(-sigma * c * dt) for c in counts],
                                                     dtype=torch.float64))


def test_volume_render_composites_background_and_stops_early() -> None:
    # ray 0: dense red medium → red; ray 1: no samples → background; ray 2: thin medium → mix
    ri = torch.tensor([0] * 50 + [2] * 10)
    ts = torch.cat([torch.arange(50) * 0.02, torch.arange(10) * 0.02]).float()
    te = ts + 0.02
    calls = []

    def rgb_sigma(t0: torch.Tensor, t1: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(int(r.numel()))
        s = torch.where(r == 0, torch.full_like(t0, 500.0), torch.ones_like(t0))
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(r.numel(), 3), s

    def sigma_fn(t0: torch.Tensor, t1: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.where(r == 0, torch.full_like(t0, 500.0), torch.ones_like(t0))

    bg = torch.tensor([0.0, 0.0, 1.0])
    out = volume_render(Samples(ri, ts, te), 3, rgb_sigma, background=bg, sigma_fn=sigma_fn)
    torch.testing.assert_close(out.rgb[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rgb[1], bg)
    a = 1 - math.exp(-1.0 * 0.2)
    torch.testing.assert_close(out.rgb[2], torch.tensor([a, 0.0, 1 - a]), atol=1e-5, rtol=0)
    # ray 0: T after k samples = exp(-10k) < 1e-4 from k = 1: only the first sample survives
    assert calls == [1 + 10] and out.n_samples == 11


def test_march_keeps_only_occupied_samples() -> None:
    grid = OccupancyGrid(8)
    occ = torch.zeros(8, 8, 8, dtype=torch.bool)
    occ[4, 4, 2:6] = True                             # z=4, y=4, x in cells 2..5 → x ∈ [0.25, 0.75)
    grid.occupied.copy_(occ.view(-1))
    o = torch.tensor([[-0.5, 0.5 + 1 / 16, 0.5 + 1 / 16], [-0.5, 0.1, 0.1]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    step = 0.01
    s = march(o, d, step, grid.lookup)
    assert set(s.ray_indices.tolist()) == {0}
    mid = o[0, 0] + 0.5 * (s.t_starts + s.t_ends)
    assert bool((mid >= 0.25).all()) and bool((mid < 0.75).all())
    assert abs(s.n - 0.5 / step) <= 1
    torch.testing.assert_close(s.t_ends - s.t_starts, torch.full((s.n,), step))
    # the occupied-cell bounding box gives the same samples
    lo, hi = grid.bounds()
    torch.testing.assert_close(lo, torch.tensor([0.25, 0.5, 0.5]))
    torch.testing.assert_close(hi, torch.tensor([0.75, 0.625, 0.625]))
    s2 = march(o, d, step, grid.lookup, box=(lo, hi))
    torch.testing.assert_close(s2.t_starts, s.t_starts)


def test_occupancy_update_threshold_decay_and_fallback() -> None:
    grid = OccupancyGrid(16, min_step_size=0.01, warmup_steps=256)
    assert bool(grid.lookup(torch.rand(5, 3)).all())            # empty grid: everything occupied
    inside = lambda x: ((x - 0.5).abs().max(dim=-1).values < 0.25).float() * 100.0  # noqa: E731
    grid.update(0, inside)
    cube = torch.zeros(16, 16, 16, dtype=torch.bool)
    cube[4:12, 4:12, 4:12] = True                                  # cells fully inside |x-0.5|<0.25
    assert torch.equal(grid.occupied.view(16, 16, 16), cube)
    torch.testing.assert_close(grid.values.view(16, 16, 16)[cube], torch.full((512,), 1.0))
    grid.update(1, lambda x: torch.zeros(x.shape[0]))               # density gone: values decay by 0.95
    torch.testing.assert_close(grid.values.max(), torch.tensor(0.95))
    assert int(grid.occupied.sum()) == 512                          # 0.95 > min(0.01, mean)
    assert [update_interval(s) for s in (0, 15, 32, 100, 1000)] == [1, 1, 2, 6, 16]
    assert should_update(48, None) and not should_update(49, None) and should_update(32, 16)


def test_march_on_the_grid_equals_march_with_the_lookup_callback() -> None:
    g = torch.Generator().manual_seed(11)
    grid = OccupancyGrid(16)
    grid.occupied.copy_(torch.rand(16 ** 3, generator=g) < 0.2)
    o = torch.rand(300, 3, generator=g) * 1.4 - 0.2                 # inside and outside the cube
    d = torch.nn.functional.normalize(torch.randn(300, 3, generator=g), dim=-1)
    jitter = torch.rand(300, generator=g)
    a = march(o, d, 0.01, grid.lookup, jitter=jitter)
    b = march(o, d, 0.01, jitter=jitter, occupancy=grid.flags())
    assert a.n > 1000
    assert torch.equal(a.ray_indices, b.ray_indices) and torch.equal(a.t_starts, b.t_starts)


def test_cached_bounds_follow_every_change_of_the_grid() -> None:
    grid = OccupancyGrid(8)
    assert grid.flags() is None                                     # nothing occupied yet
    grid.occupied.view(8, 8, 8)[1, 2, 3] = True
    lo, hi = grid.bounds()
    torch.testing.assert_close(lo, torch.tensor([3, 2, 1]) / 8)
    torch.testing.assert_close(hi, torch.tensor([4, 3, 2]) / 8)
    other = OccupancyGrid(8)
    other.occupied.view(8, 8, 8)[5, 6, 7] = True
    grid.load_state_dict(other.state_dict())                       # a resumed snapshot
    torch.testing.assert_close(grid.bounds()[0], torch.tensor([7, 6, 5]) / 8)
    grid.update(0, lambda x: torch.zeros(x.shape[0]))                # decays to nothing: empty grid
    assert grid.flags() is None and torch.equal(grid.bounds()[1], torch.ones(3))


@pytest.mark.parametrize("step", [0, 300])                          # the full pass and a partial one
def test_grid_update_does_not_depend_on_the_chunk_size(step: int) -> None:
    # The CPU trainer runs the update's density pass in batch-sized chunks (cheaper per point
    # there); the cells, their jitter and so the values must be those of one large chunk.
    from ngp_train.encoding import HashGridConfig
    from ngp_train.field import FieldConfig, NgpField

    field = NgpField(FieldConfig(grid=HashGridConfig(log2_hashmap_size=12, max_resolution=64)), seed=3)
    grids = []
    for chunk in (65536, 1000):
        grid = OccupancyGrid(16, min_step_size=0.05, warmup_steps=256, sample_fraction=0.25)
        grid.occupied[::3] = True                                  # some occupied cells to draw from
        with torch.no_grad():
            grid.update(step, lambda x: field.density(x)[0], chunk=chunk, generator=torch.Generator().manual_seed(5))
        grids.append(grid)
    assert float(grids[0].values.max()) > 0
    torch.testing.assert_close(grids[1].values, grids[0].values, rtol=1e-6, atol=0)
    assert torch.equal(grids[1].occupied, grids[0].occupied)
