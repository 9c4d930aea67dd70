"""The scene pipeline end to end on CPU: a generated 24 px scene, a few training steps.

Everything runs through the real CLI (`python -m remote_payload run`) in a subprocess, as the
controller runs it on a host; videos are decoded with the real ffmpeg, metrics recomputed with
scikit-image as the oracle.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

PY = sys.executable
# Tiny model so a step costs well under a second on a shared 2-core CPU.
FAST = ["--device", "cpu", "--backend", "torch",
        "--train-option", "log2_hashmap_size=12", "--train-option", "max_resolution=64",
        "--train-option", "occupancy_resolution=16", "--train-option", "march_steps=64",
        "--train-option", "target_samples_per_step=2048"]
N_TEST = 3


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngp_train.synth import generate_scene

    return generate_scene(tmp_path_factory.mktemp("data") / "tiny", "default", size=24, seed=0,
                          n_train=12, n_val=1, n_test=N_TEST)


def run_cmd(*args: str, timeout_s: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "remote_payload", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def broken_ffmpeg_env(tmp_path: Path) -> dict[str, str]:
    """PATH with an `ffmpeg` first that fails like a broken install (exit 1, message)."""
    bin_dir = tmp_path / "badbin"
    bin_dir.mkdir()
    exe = bin_dir / "ffmpeg"
    exe.write_text("#!/bin/sh\necho 'ffmpeg: broken build' >&2\nexit 1\n")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def start_run(scene: Path, job: Path, *extra: str) -> subprocess.Popen:
    """Start a pipeline in the background; its output goes to a file (a pipe could fill up)."""
    out = open(job.parent / f"{job.name}.console.txt", "w")   # noqa: SIM115 - closed by the OS at exit
    return subprocess.Popen([PY, "-m", "remote_payload", "run", "--data", str(scene),
                             "--job-dir", str(job), *FAST, *extra], stdout=out, stderr=out)


def status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


def wait_for(pred, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def white_composite(path: Path, background: float = 1.0) -> np.ndarray:
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64) / 255.0
    return rgba[..., :3] * rgba[..., 3:] + background * (1.0 - rgba[..., 3:])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_produces_every_artifact_and_rerun_skips(scene: Path, tmp_path: Path) -> None:
    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    job = tmp_path / "job"
    argv = ("run", "--data", str(scene), "--job-dir", str(job), "--steps", "8", "--scene", "tiny", *FAST)
    # 1st run: the video stage fails (a broken ffmpeg on PATH) → a warning: the job succeeds with
    # its metrics and summary.json names the missing videos and why
    res = run_cmd(*argv, env=broken_ffmpeg_env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    st = status(job)
    assert (st["phase"], st["exit_code"], st["error"]) == ("done", 0, None)
    first = json.loads((job / "out" / "summary.json").read_text())
    assert sorted(first["videos_missing"]) == ["compare.mp4", "gt.mp4", "render.mp4"]
    assert first["videos_missing"]["render.mp4"].startswith(
        "StageFailed: ffmpeg failed making render.mp4 (exit 1)")
    assert (job / "out" / "metrics.csv").is_file() and not (job / "out" / "videos" / "render.mp4").exists()
    # 2nd run: only the videos are made; training, rendering and scoring are not redone
    res = run_cmd(*argv)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = json.loads((job / "out" / "stages.json").read_text())
    assert [s for s, v in stages.items() if not v["skipped"]] == ["check", "videos"]
    st = status(job)
    assert (st["phase"], st["exit_code"], st["error"]) == ("done", 0, None)
    assert "videos_missing" not in json.loads((job / "out" / "summary.json").read_text())
    assert (st["step"], st["total_steps"]) == (8, 8)
    out = job / "out"
    stems = [f"r_{i}" for i in range(N_TEST)]

    # ground truth: the dataset's test views composited on white, bit for bit (±1 rounding)
    for s in stems:
        gt = np.asarray(Image.open(out / "gt" / f"{s}.png").convert("RGB"), dtype=np.float64)
        assert np.abs(gt - white_composite(scene / "test" / f"{s}.png") * 255).max() <= 1.0
        render = Image.open(out / "renders" / f"{s}.png")
        assert render.size == (24, 24) and render.mode == "RGBA"          # alpha kept: both conventions

    # metrics.csv (white) and metrics_black.csv equal an independent recomputation (scikit-image)
    means = {}
    for name, bg in (("metrics.csv", 1.0), ("metrics_black.csv", 0.0)):
        rows = read_rows(out / name)
        assert [r["frame"] for r in rows] == stems
        for r in rows:
            pred = white_composite(out / "renders" / f"{r['frame']}.png", bg)
            gt = white_composite(scene / "test" / f"{r['frame']}.png", bg)
            if bg == 1.0:
                gt = np.asarray(Image.open(out / "gt" / f"{r['frame']}.png").convert("RGB")) / 255.0
            want_psnr = peak_signal_noise_ratio(gt, pred, data_range=1.0)
            want_ssim = structural_similarity(gt, pred, data_range=1.0, channel_axis=2,
                                              gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
            assert float(r["psnr"]) == pytest.approx(want_psnr, abs=1e-3)
            assert float(r["ssim"]) == pytest.approx(want_ssim, abs=2e-3)
        means[bg] = np.mean([float(r["psnr"]) for r in rows])
    assert means[0.0] != pytest.approx(means[1.0], abs=1e-3)              # two different conventions
    rows = read_rows(out / "metrics.csv")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"] == "tiny" and summary["steps"] == 8
    assert summary["n_test_images"] == N_TEST
    assert summary["psnr_mean"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), abs=1e-5)
    assert summary["backgrounds"]["white"]["psnr_mean"] == pytest.approx(summary["psnr_mean"], abs=1e-9)
    assert summary["backgrounds"]["black"]["psnr_mean"] == pytest.approx(means[0.0], abs=1e-5)
    assert summary["ssim_mean"] == pytest.approx(np.mean([float(r["ssim"]) for r in rows]), abs=1e-5)
    assert 5 < summary["psnr_mean"] < 60
    assert summary["device"] == "cpu" and summary["backend"] == "torch" and summary["device_name"]
    assert summary["train_seconds"] > 0
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["versions"]["ffmpeg"].startswith("ffmpeg version")

    for name in ("render", "gt", "compare"):
        frames, secs = imageio_ffmpeg.count_frames_and_secs(str(out / "videos" / f"{name}.mp4"))
        assert frames == N_TEST and secs > 0, name

    log_rows = read_rows(out / "train_log.csv")
    assert int(log_rows[-1]["step"]) == 8
    log_text = (job / "log.txt").read_text()
    assert "pipeline done" in log_text and "stage videos done" in log_text

    # a rerun finds every output and redoes nothing: the snapshot is not retrained
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "stages.json"}
    t0 = time.monotonic()
    again = run_cmd("run", "--data", str(scene), "--job-dir", str(job), "--steps", "8",
                    "--scene", "tiny", *FAST)
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())
    assert all(stages[s]["skipped"] for s in ("train", "render", "gt", "metrics", "summary", "videos"))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert status(job)["exit_code"] == 0 and status(job)["step"] == 8
    assert time.monotonic() - t0 < 60


def test_killed_pipeline_resumes_from_snapshot(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    # ~10 ms a step once warm: enough steps that training is still going when status.json
    # (rewritten about once a second) first shows step >= 3.
    total = 400
    args = ("--steps", str(total), "--train-option", "snapshot_every_s=0.2")
    proc = start_run(scene, job, *args)
    try:
        snap = job / "out" / "snapshot.pt"
        wait_for(lambda: snap.exists() and (job / "status.json").exists()
                 and status(job)["step"] >= 3, 240, "a snapshot during training")
        assert status(job)["phase"] == "train" and status(job)["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)       # a crash: no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    crashed = status(job)
    assert crashed["exit_code"] is None and crashed["step"] < total   # the crash left it "running"

    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), *FAST, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((job / "out" / "train_result.json").read_text())
    assert result["steps"] == total
    assert result["resumed_from_step"] is not None and 1 <= result["resumed_from_step"] < total
    steps = [int(r["step"]) for r in read_rows(job / "out" / "train_log.csv")]
    assert steps.count(1) == 1                    # training did not start over from zero
    assert steps == sorted(steps) and steps[-1] == total
    summary = json.loads((job / "out" / "summary.json").read_text())
    assert summary["steps"] == total and summary["resumed_from_step"] == result["resumed_from_step"]
    for name in ("render", "gt", "compare"):
        assert imageio_ffmpeg.count_frames_and_secs(str(job / "out" / "videos" / f"{name}.mp4"))[0] == N_TEST


def test_sigterm_keeps_snapshot_exits_5_and_second_run_is_refused(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    proc = start_run(scene, job, "--steps", "500")
    try:
        wait_for(lambda: (job / "status.json").exists() and status(job)["phase"] == "train"
                 and status(job)["step"] >= 2, 240, "training to start")
        # while training, status.json is rewritten as steps go by (about once a second)
        seen = []
        end = time.monotonic() + 8
        while time.monotonic() < end and len({x["updated_at"] for x in seen}) < 3:
            seen.append(status(job))
            time.sleep(0.2)
        assert len({x["updated_at"] for x in seen}) >= 3
        assert seen[-1]["step"] > seen[0]["step"] and seen[-1]["eta_s"] is not None
        assert seen[-1]["loss"] is not None and seen[-1]["total_steps"] == 500
        # the controller re-attaching must never start a second copy
        second = run_cmd("run", "--data", str(scene), "--job-dir", str(job), *FAST, "--steps", "500",
                         timeout_s=60)
        assert second.returncode == 7
        assert len(second.stderr.strip().splitlines()) == 1
        assert "already running" in second.stderr and str(proc.pid) in second.stderr
        assert status(job)["pid"] == proc.pid and status(job)["exit_code"] is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
    st = status(job)
    assert (st["phase"], st["exit_code"]) == ("interrupted", 5)
    assert "SIGTERM" in st["error"] and 2 <= st["step"] < 500
    assert (job / "out" / "snapshot.pt").is_file()
    assert not (job / "out" / "train_result.json").exists()   # unfinished: a rerun resumes


def test_corrupt_snapshot_is_a_training_failure_exit_3(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "out").mkdir(parents=True)
    (job / "out" / "snapshot.pt").write_bytes(b"not a torch file")
    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), *FAST, "--steps", "5")
    assert res.returncode == 3
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training failed") and "snapshot" in line
    st = status(job)
    assert (st["phase"], st["exit_code"]) == ("failed", 3) and st["error"] == line[len("error: "):]


def test_out_of_memory_is_exit_4(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    # asks the allocator for ~0.5 TB at the first step: a real allocation failure, at once
    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), *FAST, "--steps", "5",
                  "--train-option", f"target_samples_per_step={1 << 40}")
    assert res.returncode == 4, res.stderr[-1000:]
    assert "out of memory" in res.stderr.strip().splitlines()[-1]
    assert status(job)["exit_code"] == 4


def test_cpu_share_gives_torch_its_part_of_the_cores(scene: Path, tmp_path: Path) -> None:
    # 1000 jobs on this machine: one thread each (any machine with fewer than 2000 CPUs)
    job = tmp_path / "job"
    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), *FAST, "--steps", "3", "--cpu-share", "1000")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((job / "out" / "summary.json").read_text())
    assert summary["device_name"].endswith("CPU (1 threads)"), summary["device_name"]
    assert f"1000 jobs share this machine's {os.cpu_count()} CPUs: 1 torch thread(s)" in (job / "log.txt").read_text()


def test_bad_train_option_is_rejected_before_anything_runs(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), "--train-option",
                  "log2_hashmap=12")
    assert res.returncode == 64
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --train-option log2_hashmap=12: 'log2_hashmap' is not a training option; "
        "did you mean 'log2_hashmap_size'?")
    assert not (job / "out").exists()


@pytest.mark.gpu
def test_end_to_end_on_cuda(scene: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    res = run_cmd("run", "--data", str(scene), "--job-dir", str(job), "--steps", "50",
                  "--device", "cuda", "--backend", "auto")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((job / "out" / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["backend"] in ("tcnn", "torch")
    for name in ("render", "gt", "compare"):
        assert imageio_ffmpeg.count_frames_and_secs(str(job / "out" / "videos" / f"{name}.mp4"))[0] == N_TEST
