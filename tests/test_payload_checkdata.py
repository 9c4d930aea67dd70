"""Fake and broken datasets are rejected by `check-data` and by `run` within seconds, before
any training, with the reason on one line (exit 2)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PY = sys.executable


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngp_train.synth import generate_scene

    return generate_scene(tmp_path_factory.mktemp("good") / "scene", size=16, n_train=4, n_val=1,
                          n_test=2)


def results_only(d: Path) -> None:
    """What a hub 'dataset' that holds only someone's results looks like."""
    for sub in ("renders", "gt"):
        (d / sub).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / sub / "r_0.png")
    (d / "snapshot.pt").write_bytes(b"\x80\x02weights")
    (d / "metrics.csv").write_text("frame,psnr,ssim\nr_0,30.0,0.9\n")


def html_instead_of_images(d: Path) -> None:
    """A mirror that answered every file with an HTML error page."""
    for p in d.rglob("*.png"):
        p.write_text("<html><body>404 Not Found</body></html>")


def missing_frame(d: Path) -> None:
    (d / "test" / "r_1.png").unlink()


def truncated_frame(d: Path) -> None:
    p = d / "train" / "r_2.png"
    p.write_bytes(p.read_bytes()[:120])


def mixed_sizes(d: Path) -> None:
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(d / "test" / "r_0.png")


def no_test_split(d: Path) -> None:
    (d / "transforms_test.json").unlink()


def bad_json(d: Path) -> None:
    (d / "transforms_train.json").write_text('{"camera_angle_x": 0.69, "frames": [')


CASES: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "results_only": (results_only, "results-only"),
    "html_pages": (html_instead_of_images, "r_0"),
    "missing_frame": (missing_frame, "does not exist"),
    "truncated_frame": (truncated_frame, "r_2"),
    "mixed_sizes": (mixed_sizes, "same size"),
    "no_test_split": (no_test_split, "transforms_test.json"),
    "bad_json": (bad_json, "not valid JSON"),
}


def make_case(name: str, good: Path, tmp_path: Path) -> Path:
    breaker, _ = CASES[name]
    d = tmp_path / name
    if name == "results_only":
        d.mkdir()
    else:
        shutil.copytree(good, d)
    assert breaker is not None
    breaker(d)
    return d


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_check_data_accepts_a_good_scene_and_reports_counts(good: Path) -> None:
    res = subprocess.run([PY, "-m", "remote_payload", "check-data", str(good)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["n_train"], info["n_val"], info["n_test"], info["width"], info["height"]) == (4, 1, 2, 16, 16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_data_rejects_with_one_line(case: str, good: Path, tmp_path: Path) -> None:
    d = make_case(case, good, tmp_path)
    t0 = time.monotonic()
    res = subprocess.run([PY, "-m", "remote_payload", "check-data", str(d)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0        # exactly one line on stderr
    line = one_error_line(res.stderr)
    assert CASES[case][1] in line, line
    assert time.monotonic() - t0 < 30


def test_check_data_missing_directory(tmp_path: Path) -> None:
    res = subprocess.run([PY, "-m", "remote_payload", "check-data", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "does not exist" in one_error_line(res.stderr)


@pytest.mark.parametrize("case", ["results_only", "html_pages", "truncated_frame"])
def test_run_rejects_bad_data_before_training(case: str, good: Path, tmp_path: Path) -> None:
    d = make_case(case, good, tmp_path)
    job = tmp_path / "job"
    t0 = time.monotonic()
    res = subprocess.run([PY, "-m", "remote_payload", "run", "--data", str(d), "--job-dir", str(job),
                          "--steps", "100000", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-1000:]
    line = one_error_line(res.stderr)
    assert CASES[case][1] in line
    st = json.loads((job / "status.json").read_text())
    assert (st["phase"], st["exit_code"], st["step"]) == ("failed", 2, 0)
    assert st["error"] == line[len("error: "):]
    assert not (job / "out" / "snapshot.pt").exists() and not (job / "out" / "train_log.csv").exists()
    assert "Traceback" not in (job / "log.txt").read_text()
    assert elapsed < 60   # seconds (torch import on a busy machine), not a training run


def test_detached_run_logging_to_log_txt_writes_each_line_once(good: Path, tmp_path: Path) -> None:
    """The controller starts `run` with stdout/stderr appended to JOB_DIR/log.txt; the pipeline
    must then not add its own handler on the same file (every line would appear twice)."""
    d = make_case("results_only", good, tmp_path)
    job = tmp_path / "job"
    job.mkdir()
    with open(job / "log.txt", "a") as log_fh:
        code = subprocess.run([PY, "-m", "remote_payload", "run", "--data", str(d), "--job-dir",
                               str(job)], stdout=log_fh, stderr=log_fh, timeout=120).returncode
    assert code == 2
    text = (job / "log.txt").read_text()
    assert text.count("pipeline start") == 1
    assert text.count("results-only copy") == 2     # the ERROR log line and the final `error:` line
    assert text.strip().splitlines()[-1].startswith("error: ")


def test_check_data_finds_a_truncated_frame_it_does_not_decode_and_decodes_only_a_sample(
        good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from remote_payload.checkdata import SAMPLE_PER_SPLIT, _sample, check_data
    from remote_payload.errors import BadData

    d = tmp_path / "scene"
    shutil.copytree(good, d)
    assert 1 not in _sample(4)                        # train/r_1 is not among the decoded frames
    decoded: list[str] = []
    orig = ImageFile.ImageFile.load

    def counting_load(self):  # noqa: ANN001, ANN202
        decoded.append(str(getattr(self, "filename", "")))
        return orig(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    report = check_data(d)
    assert report.n_train == 4
    # 4 train, 1 val, 2 test frames: at most SAMPLE_PER_SPLIT decoded per split, not all 7
    assert 0 < len(decoded) <= 3 + 1 + 2 < 7 and SAMPLE_PER_SPLIT == 3
    p = d / "train" / "r_1.png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 30])             # cut inside the last chunks: the header still reads
    with pytest.raises(BadData, match=r"r_1\.png: image is truncated"):
        check_data(d)
