"""Training end to end on a tiny generated scene: learning, snapshots, resume, stop, render, eval."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ngp_train.metrics import evaluate_dirs, psnr
from ngp_train.render import render_split
from ngp_train.synth import generate_scene
from ngp_train.train import TrainConfig, Trainer, lr_at, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201 - tiny tensors: one thread is as fast, and far faster on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

FAST = TrainConfig(steps=30, device="cpu", backend="torch", target_samples_per_step=2048, eval=False,
                   log2_hashmap_size=12, occupancy_resolution=32, progress_every=5)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("scene") / "s", size=24, seed=0, n_train=12, n_val=1, n_test=2)


def _log_rows(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_learns_and_writes_summary(scene: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []
    cfg = replace(FAST, steps=100, eval=True)
    res = train(scene, tmp_path, cfg, progress=lambda s, t, loss, p, e: seen.append((s, t, loss)))
    assert res.steps == 100 and res.resumed_from_step is None and res.backend == "torch" and res.device == "cpu"
    assert [s for s, _, _ in seen] == list(range(5, 101, 5)) and all(t == 100 for _, t, _ in seen)
    rows = _log_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(5, 101, 5))
    secs = [float(r["seconds"]) for r in rows]
    assert secs == sorted(secs) and secs[-1] == pytest.approx(res.train_seconds, abs=1e-3)
    first, last = np.mean([float(r["loss"]) for r in rows[:3]]), np.mean([float(r["loss"]) for r in rows[-3:]])
    assert last < 0.5 * first
    summary = json.loads((tmp_path / "summary.json").read_text())
    for k in ("psnr_mean", "ssim_mean", "steps", "train_seconds", "backend", "device", "n_test_images"):
        assert k in summary
    assert summary["n_test_images"] == 2 and summary["steps"] == 100
    assert summary["device_defaults"]["occupancy_resolution"] == 64           # CPU default, recorded
    assert summary["model_config"]["occupancy_resolution"] == 32              # the override actually used
    # better than the trivial all-white prediction, and the summary equals a fresh evaluation
    gts = sorted((tmp_path / "gt").glob("*.png"))
    white = np.mean([psnr(np.ones((24, 24, 3)), _rgb(p)) for p in gts])
    assert summary["psnr_mean"] > white + 3.0
    rows_eval = evaluate_dirs(tmp_path / "renders", tmp_path / "gt")
    # float32 metrics on both sides of the comparison: equal within 1e-4 dB
    assert np.mean([r.psnr for r in rows_eval]) == pytest.approx(summary["psnr_mean"], abs=1e-4)
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "frame,psnr,ssim" and [m.split(",")[0] for m in metrics[1:]] == ["r_0", "r_1"]


def _rgb(p: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255


def test_resume_stop_and_no_retrain(scene: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def stop_after_7() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    r1 = train(scene, tmp_path, FAST, should_stop=stop_after_7)
    assert r1.steps == 7 and (tmp_path / "snapshot.pt").is_file()
    assert not (tmp_path / "summary.json").exists()                  # interrupted: no evaluation
    r2 = train(scene, tmp_path, FAST)
    assert r2.resumed_from_step == 7 and r2.steps == 30 and r2.train_seconds > r1.train_seconds
    assert [int(r["step"]) for r in _log_rows(tmp_path)] == [5, 10, 15, 20, 25, 30]
    mtime = (tmp_path / "snapshot.pt").stat().st_mtime_ns
    r3 = train(scene, tmp_path, replace(FAST, steps=20))              # snapshot already past 20 steps
    assert r3.steps == 30 and r3.resumed_from_step == 30 and r3.train_seconds == pytest.approx(r2.train_seconds)
    assert (tmp_path / "snapshot.pt").stat().st_mtime_ns == mtime


def test_deterministic_by_seed(scene: Path, tmp_path: Path) -> None:
    a = train(scene, tmp_path / "a", replace(FAST, steps=8))
    b = train(scene, tmp_path / "b", replace(FAST, steps=8))
    c = train(scene, tmp_path / "c", replace(FAST, steps=8, seed=1))
    assert a.final_loss == b.final_loss and a.final_loss != c.final_loss


def test_max_seconds_stops_training(scene: Path, tmp_path: Path) -> None:
    res = train(scene, tmp_path, replace(FAST, steps=100000, max_seconds=1.0))
    assert 0 < res.steps < 100000 and 1.0 <= res.train_seconds < 10.0


def test_render_split_matches_training_evaluation_and_cli(scene: Path, tmp_path: Path) -> None:
    res = train(scene, tmp_path / "run", replace(FAST, steps=15))
    paths = render_split(res.snapshot_path, scene, "test", tmp_path / "renders", device="cpu")
    assert [p.name for p in paths] == ["r_0.png", "r_1.png"]
    tr = Trainer(scene, tmp_path / "run", replace(FAST, steps=15))
    assert tr.resumed_from_step == 15
    _, preds, _ = tr.render_views("test")
    ours = _rgb(paths[1])
    np.testing.assert_allclose(ours, preds[1].numpy(), atol=1 / 255 + 1e-6)
    from ngp_train.__main__ import main

    assert main(["eval", "--pred", str(tmp_path / "renders"), "--gt", str(scene / "test"),
                 "--out", str(tmp_path / "m.csv")]) == 0
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "frame,psnr,ssim" and len(lines) == 3


def test_adaptive_batch_tracks_target_samples(scene: Path, tmp_path: Path) -> None:
    tr = Trainer(scene, tmp_path, replace(FAST, steps=60, target_samples_per_step=1500))
    counts = []
    for _ in range(25):
        _, n = tr.train_step()
        counts.append(n)
    assert 750 < np.median(counts[-8:]) < 3000


def test_sample_budget_renders_the_leading_rays_that_fit(scene: Path, tmp_path: Path) -> None:
    tr = Trainer(scene, tmp_path, FAST)
    n = 64
    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, tr.images.shape[0], (n,), generator=g)
    px, py = torch.randint(0, tr.width, (n,), generator=g), torch.randint(0, tr.height, (n,), generator=g)
    from ngp_train.model import camera_rays
    o, d = camera_rays(tr.c2w[img], px, py, tr.focal, tr.width, tr.height)
    bg, jitter = torch.rand((n, 3), generator=g), torch.rand(n, generator=g)
    with torch.no_grad():
        full = tr.model.render_rays(o, d, bg, jitter=jitter, early_stop=False)     # empty grid: all occupied
        cut = tr.model.render_rays(o, d, bg, jitter=jitter, early_stop=False, max_samples=full.n_samples // 3)
    assert full.n_samples > 1000 and cut.n_marched == full.n_samples
    assert cut.n_samples <= full.n_samples // 3 and 0 < cut.rgb.shape[0] < n
    k = cut.rgb.shape[0]
    torch.testing.assert_close(cut.rgb, full.rgb[:k], atol=1e-6, rtol=0)          # the same rays, unchanged
    counts = [tr.train_step()[1] for _ in range(6)]                               # first steps: no overrun
    assert max(counts) <= FAST.target_samples_per_step and min(counts) > 0


def test_lr_schedule() -> None:
    assert lr_at(0, 30000, 1e-2) == 1e-2 and lr_at(19999, 30000, 1e-2) == 1e-2
    assert lr_at(20000, 30000, 1e-2) == pytest.approx(3.3e-3)
    assert lr_at(30000, 30000, 1e-2) == pytest.approx(1e-2 * 0.33 ** 2)


def test_optimizer_is_instant_ngp_adam(scene: Path, tmp_path: Path) -> None:
    tr = Trainer(scene, tmp_path, FAST)
    g = tr.optimizer.param_groups
    assert all(x["betas"] == (0.9, 0.99) and x["eps"] == 1e-15 and x["lr"] == 1e-2 for x in g)
    assert g[0]["params"][0] is tr.model.field.encoding.table and g[0]["weight_decay"] == 0.0


@pytest.mark.gpu
def test_tcnn_backend_trains_on_cuda(scene: Path, tmp_path: Path) -> None:
    from ngp_train.tcnn_backend import tcnn_available

    if not tcnn_available():
        pytest.skip("tinycudann is not installed")
    res = train(scene, tmp_path, replace(FAST, device="cuda", backend="tcnn", steps=50, eval=True))
    assert res.backend == "tcnn" and res.device == "cuda" and res.psnr_mean is not None and res.psnr_mean > 12


@pytest.mark.gpu
def test_torch_backend_autocast_on_cuda(scene: Path, tmp_path: Path) -> None:
    res = train(scene, tmp_path, replace(FAST, device="cuda", backend="torch", steps=50, eval=True))
    assert res.device == "cuda" and res.psnr_mean is not None and res.psnr_mean > 12
    assert torch.cuda.is_available()


def test_cpu_step_flushes_denormal_moments_and_restores_the_flag(scene: Path, tmp_path: Path) -> None:
    # Adam's moments of rarely hit rows decay into float32's denormal range (slow on x86); the CPU
    # step runs with flush-to-zero, so such a moment of a row with no gradient becomes 0 rather
    # than 0.9 x a denormal, and the flag does not outlive the step.
    tr = Trainer(scene, tmp_path, FAST)
    tr.train_step()
    table = tr.model.field.encoding.table
    state = tr.optimizer.state[table]
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        state["exp_avg"].fill_(tiny / 4)                                   # denormal everywhere
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    tr.train_step()
    m = state["exp_avg"]
    assert int(((m != 0) & (m.abs() < tiny)).sum()) == 0                  # none left denormal
    assert bool((m == 0).any())                                           # rows without gradient went to 0
    assert float(torch.tensor([tiny / 4]) * 1.0) > 0                      # denormals work again after the step


def test_pixel_gather_equals_advanced_indexing(scene: Path, tmp_path: Path) -> None:
    # The step gathers its rays' pixels with one index_select over flat pixel rows; it must pick
    # exactly images[img, py, px], corners of the images included.
    tr = Trainer(scene, tmp_path, FAST)
    g = torch.Generator().manual_seed(2)
    n_img = tr.images.shape[0]
    img = torch.cat([torch.randint(0, n_img, (500,), generator=g), torch.tensor([0, n_img - 1])])
    py = torch.cat([torch.randint(0, tr.height, (500,), generator=g), torch.tensor([0, tr.height - 1])])
    px = torch.cat([torch.randint(0, tr.width, (500,), generator=g), torch.tensor([tr.width - 1, 0])])
    got = tr.pixels(img, py, px)
    assert got.dtype == torch.uint8 and got.shape == (502, 4)
    assert torch.equal(got, tr.images[img, py, px])
    assert int(got[:, 3].max()) > 0                                # real image content, not zeros
