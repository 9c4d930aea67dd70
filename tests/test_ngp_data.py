"""Scene generator, loader, validation, metrics and the CLI's handling of bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ngp_train.cameras import focal_from_angle
from ngp_train.data import load_poses, load_split, validate_dataset
from ngp_train.errors import DatasetError
from ngp_train.metrics import evaluate_dirs, psnr, ssim
from ngp_train.synth import SCENES, generate_scene


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201 - tiny tensors: one thread is as fast, and far faster on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("scene") / "default", size=24, seed=0,
                          n_train=4, n_val=2, n_test=3)


def _copy(scene: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(scene, dst)
    return dst


def test_scene_files_are_nerf_synthetic(scene: Path) -> None:
    meta = json.loads((scene / "transforms_train.json").read_text())
    assert meta["camera_angle_x"] == pytest.approx(0.6911112070083618)
    assert [f["file_path"] for f in meta["frames"]] == [f"./train/r_{k}" for k in range(4)]
    for f in meta["frames"]:
        m = np.array(f["transform_matrix"])
        assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
        pos = m[:3, 3]
        assert np.linalg.norm(pos) == pytest.approx(4.0)               # on a sphere of radius 4
        assert pos[2] > 0                                              # upper hemisphere
        np.testing.assert_allclose(-m[:3, 2], -pos / np.linalg.norm(pos), atol=1e-9)   # looks at origin
        np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-9)
    im = Image.open(scene / "train" / "r_0.png")
    assert im.mode == "RGBA" and im.size == (24, 24)
    a = np.asarray(im)[..., 3]
    assert a.min() == 0 and a.max() == 255 and ((a > 0) & (a < 255)).any()   # soft silhouette edges
    rgb = np.asarray(im)[..., :3][a == 255].reshape(-1, 3)
    assert len(np.unique(rgb // 32, axis=0)) >= 6                             # several colours


def test_generator_is_deterministic_and_scenes_differ(tmp_path: Path) -> None:
    assert SCENES[0] == "default" and len(SCENES) >= 4
    a = generate_scene(tmp_path / "a", size=16, seed=3, n_train=1, n_val=1, n_test=1)
    b = generate_scene(tmp_path / "b", size=16, seed=3, n_train=1, n_val=1, n_test=1)
    c = generate_scene(tmp_path / "c", size=16, seed=4, n_train=1, n_val=1, n_test=1)
    d = generate_scene(tmp_path / "d", scene="rods", size=16, seed=3, n_train=1, n_val=1, n_test=1)
    read = lambda p: (p / "train" / "r_0.png").read_bytes()  # noqa: E731
    assert read(a) == read(b) and (a / "transforms_train.json").read_text() == (b / "transforms_train.json").read_text()
    assert read(a) != read(c) and read(a) != read(d)


def test_loader_round_trip(scene: Path) -> None:
    info = validate_dataset(scene)
    assert (info.n_train, info.n_val, info.n_test, info.width, info.height) == (4, 2, 3, 24, 24)
    split = load_split(scene, "train")
    assert split.names == ("r_0", "r_1", "r_2", "r_3")
    assert split.focal == pytest.approx(focal_from_angle(24, 0.6911112070083618))
    raw = np.asarray(Image.open(scene / "train" / "r_2.png"))
    assert split.images.dtype == np.uint8                       # a quarter of float32's memory
    np.testing.assert_array_equal(split.images[2], raw)
    meta = json.loads((scene / "transforms_train.json").read_text())
    np.testing.assert_allclose(split.c2w[1], np.array(meta["frames"][1]["transform_matrix"]), atol=1e-6)
    half = load_split(scene, "train", downscale=2)
    assert half.images.shape == (4, 12, 12, 4) and half.focal == pytest.approx(split.focal / 2)
    # premultiplied box filter: alpha is the plain mean of the 2x2 block
    assert half.images.dtype == np.uint8
    assert abs(float(half.images[0, 5, 7, 3]) - split.images[0, 10:12, 14:16, 3].astype(float).mean()) <= 0.5
    # poses without decoding: the same cameras, names and focal length as the full load
    poses = load_poses(scene, "train", downscale=2)
    assert poses.names == half.names and (poses.width, poses.height) == (12, 12)
    assert poses.focal == pytest.approx(half.focal)
    np.testing.assert_array_equal(poses.c2w, half.c2w)


def test_center_pixel_ray_passes_through_origin(scene: Path) -> None:
    import torch

    from ngp_train.model import camera_rays

    split = load_split(scene, "test")
    c2w = torch.from_numpy(split.c2w[0])
    # rays through the four pixels around the image centre straddle the origin
    o, d = camera_rays(c2w, torch.tensor([11, 12]), torch.tensor([11, 12]), split.focal, 24, 24)
    mid = (d[0] + d[1]) / 2
    mid = mid / mid.norm()
    closest = o[0] - (o[0] @ mid) * mid
    assert float(closest.norm()) < 1e-5


@pytest.mark.parametrize("breakage,message", [
    ("missing_test", "missing transforms_test.json"),
    ("missing_frame", "which does not exist"),
    ("wrong_size", "all frames must have the same size"),
    ("results_only", "results-only copy"),
    ("bad_json", "not valid JSON"),
    ("no_angle", "camera_angle_x"),
])
def test_bad_datasets_give_one_line(scene: Path, tmp_path: Path, breakage: str, message: str) -> None:
    d = _copy(scene, tmp_path)
    if breakage == "missing_test":
        (d / "transforms_test.json").unlink()
    elif breakage == "missing_frame":
        (d / "train" / "r_3.png").unlink()
    elif breakage == "wrong_size":
        Image.new("RGBA", (30, 24)).save(d / "val" / "r_1.png")
    elif breakage == "results_only":
        for f in d.glob("transforms_*.json"):
            f.unlink()
        shutil.rmtree(d / "train")
        (d / "renders").mkdir()
        (d / "snapshot.pt").write_bytes(b"x")
    elif breakage == "bad_json":
        (d / "transforms_train.json").write_text("{not json")
    elif breakage == "no_angle":
        meta = json.loads((d / "transforms_train.json").read_text())
        del meta["camera_angle_x"]
        (d / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as e:
        validate_dataset(d)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the CLI says the same in one line, exits 2 and trains nothing
    out = tmp_path / "out"
    code, err = _cli(["train", "--data", str(d), "--out", str(out), "--steps", "5", "--device", "cpu"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (out / "snapshot.pt").exists()


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run the real CLI entry point in-process; return (exit code, stderr text)."""
    import contextlib
    import io
    import logging

    from ngp_train.__main__ import main

    buf = io.StringIO()
    root = logging.getLogger()
    handlers = list(root.handlers)
    with contextlib.redirect_stderr(buf):
        try:
            code = main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    root.handlers = handlers
    return code, buf.getvalue()


def test_cli_rejects_bad_options(scene: Path, tmp_path: Path) -> None:
    for args, needle in ([["--steps", "0"], "steps must be"], [["--backend", "tcnn", "--device", "cpu"], "tcnn"],
                         [["--downscale", "0"], "downscale"], [["--backend", "jax"], "invalid choice"]):
        code, err = _cli(["train", "--data", str(scene), "--out", str(tmp_path / "o"), *args])
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "o" / "snapshot.pt").exists()


def test_cli_subprocess_bad_data_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ngp_train", "train", "--data", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: dataset directory does not exist"]


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, win_size=11, K1=0.01, K2=0.03))


def test_psnr_ssim_match_scikit_image(scene: Path) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    gt = np.asarray(Image.open(scene / "test" / "r_0.png").convert("RGBA"), dtype=np.float64) / 255
    gt = gt[..., :3] * gt[..., 3:] + (1 - gt[..., 3:])
    pairs = [(rng.random((32, 40, 3)), rng.random((32, 40, 3))),
             (gt, np.clip(gt + 0.05 * rng.standard_normal(gt.shape), 0, 1)),
             (gt, np.clip(gt * 0.9 + 0.05, 0, 1))]
    # a frame-sized pair with a realistic error (~30 dB): float32 sums over 0.6 M values
    yy, xx = np.mgrid[0:400, 0:400] / 400.0
    big = np.stack([xx, yy, 0.5 + 0.5 * np.sin(8 * xx * yy)], axis=-1)
    pairs.append((big, np.clip(big + 0.03 * rng.standard_normal(big.shape), 0, 1)))
    pairs.append(((big * 255).round() / 255, (np.clip(big + 0.01 * rng.standard_normal(big.shape), 0, 1) * 255)
                  .round() / 255))
    for a, b in pairs:
        # the bound is 0.01 dB / 1e-4; float32 on the device is 10x inside it here
        assert psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)
        assert ssim(b, a) == pytest.approx(_skimage_ssim(a, b), abs=1e-5)
    # uint8 tensors are read as /255
    a8 = torch.from_numpy((pairs[-1][0] * 255).round().astype(np.uint8))
    b8 = torch.from_numpy((pairs[-1][1] * 255).round().astype(np.uint8))
    assert psnr(b8, a8) == pytest.approx(psnr(pairs[-1][1], pairs[-1][0]), abs=1e-4)
    assert ssim(gt, gt) == pytest.approx(1.0) and psnr(gt, gt) == float("inf")


def test_evaluate_dirs_order_background_and_resampling(tmp_path: Path) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    smooth = np.stack([xx, yy, 0.5 * (xx + yy)], axis=-1)
    for k in (10, 2, 1):
        img = np.clip(smooth + 0.01 * k, 0, 1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(gt / f"r_{k}.png")
    # r_1: identical; r_2: RGBA with transparent right half → white there; r_10: predicted at half size
    Image.open(gt / "r_1.png").save(pred / "r_1.png")
    rgba = np.concatenate([np.asarray(Image.open(gt / "r_2.png")), np.full((32, 32, 1), 255, np.uint8)], -1)
    rgba[:, 16:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(pred / "r_2.png")
    Image.open(gt / "r_10.png").resize((16, 16), Image.BICUBIC).save(pred / "r_10.png")
    rows = evaluate_dirs(pred, gt)
    assert [r.frame for r in rows] == ["r_1", "r_2", "r_10"]
    assert rows[0].psnr == float("inf") and rows[0].ssim == pytest.approx(1.0)
    g2 = np.asarray(Image.open(gt / "r_2.png"), dtype=np.float64) / 255
    white = g2.copy()
    white[:, 16:] = 1.0
    assert rows[1].psnr == pytest.approx(psnr(white, g2), abs=1e-9)
    assert 25 < rows[2].psnr < 60                                     # resampled, close but not exact


def test_load_poses_decodes_no_image(scene: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def refuse(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    poses = load_poses(scene, "test")
    assert poses.names == ("r_0", "r_1", "r_2") and poses.c2w.shape == (3, 4, 4)
