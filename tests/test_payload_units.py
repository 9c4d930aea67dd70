"""remote_payload pieces without training: bootstrap, frames order, videos, status, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from remote_payload import bootstrap as bs
from remote_payload.frames import composite_on_white, numeric_key, write_gt_frames
from remote_payload.status import StatusWriter, is_pipeline_process, pid_alive, read_status
from remote_payload.videos import make_videos

PY = sys.executable


# ---------- bootstrap ----------

def run_bootstrap(out: Path, *extra: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    res = subprocess.run([PY, "-m", "remote_payload", "bootstrap", "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), time.monotonic() - t0


def test_bootstrap_records_this_host_and_second_call_is_cached_and_fast(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "env.json"
    first, first_s = run_bootstrap(out)
    assert first["cached"] is False
    assert first["torch"] == torch.__version__
    assert first["cuda"] is torch.cuda.is_available()
    assert first["python_executable"].endswith(Path(sys.executable).resolve().name)
    if not first["cuda"]:
        assert first["backend"] == "torch" and first["device"] == "cpu"
        assert any("no CUDA" in w for w in first["warnings"])
    on_disk = json.loads(out.read_text())
    assert on_disk["cache_key"] == first["cache_key"] and "cached" not in on_disk
    second, second_s = run_bootstrap(out)
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k != "cached"} == on_disk
    # the second call does not import torch: it is clearly faster than the probing one
    assert second_s < first_s


def test_bootstrap_second_call_does_not_import_torch(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    run_bootstrap(out)
    res = subprocess.run([PY, "-X", "importtime", "-m", "remote_payload", "bootstrap", "--out",
                          str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
    assert json.loads(res.stdout)["cached"] is True


def test_bootstrap_reprobes_when_the_cache_key_changes(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    run_bootstrap(out)
    stale = json.loads(out.read_text())
    stale["cache_key"] = "/old/python|torch=1.0"
    out.write_text(json.dumps(stale))
    again, _ = run_bootstrap(out)
    assert again["cached"] is False
    assert json.loads(out.read_text())["cache_key"] == bs.cache_key()


def test_tcnn_build_hint_uses_compute_capability() -> None:
    assert bs.tcnn_build_hint((8, 6)).startswith("TCNN_CUDA_ARCHITECTURES=86 pip install")
    assert bs.tcnn_build_hint((9, 0)).startswith("TCNN_CUDA_ARCHITECTURES=90 ")


def test_cuda_without_tcnn_falls_back_to_torch_with_build_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch on this CPU machine: torch.cuda answers as an H100 would; tinycudann is
    really not installed here, so the fallback and its advice are the real code path."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    env = bs.probe()
    assert env["cuda"] is True and env["device"] == "cuda"
    assert env["gpu_name"] == "NVIDIA H100 80GB HBM3" and env["compute_capability"] == "9.0"
    assert env["tcnn"] is False and env["backend"] == "torch"
    assert env["tcnn_build"].startswith("TCNN_CUDA_ARCHITECTURES=90 ")
    assert any("tiny-cuda-nn is not importable" in w and "TCNN_CUDA_ARCHITECTURES=90" in w
               for w in env["warnings"])


@pytest.mark.gpu
def test_bootstrap_on_a_real_gpu(tmp_path: Path) -> None:
    import torch

    env, _ = run_bootstrap(tmp_path / "env.json")
    assert env["cuda"] is True
    assert env["gpu_name"] == torch.cuda.get_device_name(0)
    assert env["backend"] in ("tcnn", "torch")


# ---------- frames ----------

def test_numeric_key_orders_r2_before_r10() -> None:
    names = ["r_10", "r_2", "r_1", "r_0", "r_100", "r_11"]
    assert sorted(names, key=numeric_key) == ["r_0", "r_1", "r_2", "r_10", "r_11", "r_100"]


def test_composite_on_white_respects_alpha() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)          # transparent becomes white
    rgba[1, 0] = (0, 0, 0, 128)        # half black → mid grey
    out = composite_on_white(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[1, 0, 0]) - 127) <= 1


def make_indexed_frames(d: Path, n: int, *, size: tuple[int, int] = (24, 24), alpha: bool = False,
                        offset: int = 0) -> None:
    """Frame r_i is a flat grey of level 20*i+offset (so its index can be read back from video)."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        level = 20 * i + offset
        arr = np.full((size[1], size[0], 4 if alpha else 3), level, np.uint8)
        if alpha:
            arr[..., 3] = 255
        Image.fromarray(arr).save(d / f"r_{i}.png")


def decode(path: Path) -> list[np.ndarray]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]


def test_gt_frames_numeric_order_and_white_background(tmp_path: Path) -> None:
    data = tmp_path / "scene"
    make_indexed_frames(data / "test", 12, alpha=True)
    # a transparent corner in every frame: must become white
    for p in (data / "test").glob("*.png"):
        a = np.asarray(Image.open(p)).copy()
        a[:4, :4, 3] = 0
        Image.fromarray(a, "RGBA").save(p)
    order = [5, 11, 2, 10, 0, 1, 3, 4, 6, 7, 8, 9]      # transforms order is not numeric order
    (data / "transforms_test.json").write_text(json.dumps(
        {"camera_angle_x": 0.7, "frames": [{"file_path": f"./test/r_{i}"} for i in order]}))
    written = write_gt_frames(data, tmp_path / "gt")
    assert [p.stem for p in written] == [f"r_{i}" for i in range(12)]
    img = np.asarray(Image.open(tmp_path / "gt" / "r_10.png"))
    assert img.shape == (24, 24, 3)
    assert img[0, 0].tolist() == [255, 255, 255] and img[10, 10].tolist() == [200, 200, 200]


# ---------- videos ----------

def test_videos_have_every_frame_in_order_and_compare_is_side_by_side(tmp_path: Path) -> None:
    n = 11
    make_indexed_frames(tmp_path / "renders", n, size=(25, 23))     # odd size: padded to even
    make_indexed_frames(tmp_path / "gt", n, size=(25, 23), offset=10)
    stems = sorted((p.stem for p in (tmp_path / "renders").glob("*.png")), key=numeric_key)
    vids = make_videos([tmp_path / "renders" / f"{s}.png" for s in stems],
                       [tmp_path / "gt" / f"{s}.png" for s in stems], tmp_path / "videos", fps=10)
    for name in ("render", "gt", "compare"):
        frames, secs = imageio_ffmpeg.count_frames_and_secs(str(vids[name]))
        assert frames == n and secs > 0
    levels = [float(f[5:15, 5:15].mean()) for f in decode(vids["render"])]
    assert all(abs(lv - 20 * i) < 4 for i, lv in enumerate(levels)), levels
    cmp_frames = decode(vids["compare"])
    f = cmp_frames[3]
    h, w = f.shape[:2]
    assert w >= 2 * 25 and h > 23          # two frames side by side under a label band
    body = f[h - 20:h - 4]
    assert abs(float(body[:, 4:20].mean()) - 60) < 4          # render r_3 on the left
    assert abs(float(body[:, w - 20:w - 6].mean()) - 70) < 4   # ground truth r_3 on the right
    assert float(f[:12].min()) < 100                           # dark label text in the band


def test_existing_video_is_not_rewritten(tmp_path: Path) -> None:
    make_indexed_frames(tmp_path / "r", 3)
    paths = sorted((tmp_path / "r").glob("*.png"), key=lambda p: numeric_key(p.stem))
    vids = make_videos(paths, paths, tmp_path / "v")
    before = {k: v.stat().st_mtime_ns for k, v in vids.items()}
    time.sleep(0.05)
    vids2 = make_videos(paths, paths, tmp_path / "v")
    assert {k: v.stat().st_mtime_ns for k, v in vids2.items()} == before


# ---------- status ----------

def test_status_writer_is_atomic_throttled_and_readable(tmp_path: Path) -> None:
    w = StatusWriter(tmp_path, min_interval_s=10.0)
    w.set_phase("train", total_steps=100)
    first = read_status(tmp_path)
    assert first is not None and first.phase == "train" and first.exit_code is None
    w.update(step=5, loss=0.5)           # throttled: not written yet
    assert read_status(tmp_path).step == 0
    w.update(step=6, loss=0.4, force=True)
    got = read_status(tmp_path)
    assert (got.step, got.loss, got.pid) == (6, 0.4, first.pid)
    w.finish("done", 0)
    done = read_status(tmp_path)
    assert done.exit_code == 0 and done.phase == "done" and done.updated_at.endswith("Z")
    assert not list(tmp_path.glob(".*tmp"))
    assert set(json.loads((tmp_path / "status.json").read_text())) == {
        "phase", "step", "total_steps", "loss", "psnr", "eta_s", "updated_at", "pid",
        "exit_code", "error", "cuda_visible_devices"}


def test_status_records_the_gpu_the_pipeline_was_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    StatusWriter(tmp_path).set_phase("check")
    assert json.loads((tmp_path / "status.json").read_text())["cuda_visible_devices"] == "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    StatusWriter(tmp_path).set_phase("check")
    assert read_status(tmp_path).cuda_visible_devices is None


def test_pid_checks() -> None:
    import os

    assert pid_alive(os.getpid())
    assert not is_pipeline_process(os.getpid())       # pytest is not `remote_payload run`
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(30)", "remote_payload", "run"])
    try:
        end = time.monotonic() + 10
        while b"remote_payload" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < end
            time.sleep(0.02)
        assert is_pipeline_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)


def test_unknown_command_and_missing_args_exit_64_with_one_line() -> None:
    for argv in (["frobnicate"], ["run", "--data", "x"], ["run", "--data", "x", "--job-dir", "y",
                                                          "--steps", "zero"]):
        res = subprocess.run([PY, "-m", "remote_payload", *argv], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 64, argv
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
