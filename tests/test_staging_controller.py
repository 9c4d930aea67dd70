"""Controller-side staging through the real LocalTransport: the host process is really started
detached, polled, and its cache reused; uploads of file:// copies when no mirror answers."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import DatasetConfig
from orchestrator.config.model import GenerateSpec
from orchestrator.errors import DatasetInvalid, StagingError
from orchestrator.staging import StageTuning, content_key, estimate_staging_seconds, prefetch_dataset, stage_dataset
from orchestrator.staging.estimate import ASSUMED_RATE_BYTES_PER_S, ASSUMED_SIZE_BYTES
from orchestrator.staging.mirror_server import MirrorBehaviour, MirrorServer
from orchestrator.staging.mirrored import dataset_key
from orchestrator.transport.local import LocalTransport

REPO = Path(__file__).resolve().parents[1]
TUNING = StageTuning(timeout_s=60, stall_period_s=0.5, probe_timeout_s=2.0, probe_bytes=64 * 1024)

def dataset(name: str, mirrors: list[str], **kw: Any) -> DatasetConfig:
    return DatasetConfig(name=name, mirrors=tuple(mirrors), **kw)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngp_train.synth import generate_scene
    d = generate_scene(tmp_path_factory.mktemp("src") / "lego", size=16, n_train=4, n_val=1, n_test=2)
    (d / "padding.bin").write_bytes(os.urandom(1_000_000))
    return d


def zip_dir(root: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, f"{prefix}/{p.relative_to(root)}")
    return buf.getvalue()


@pytest.fixture()
def transport(tmp_path: Path) -> LocalTransport:
    return LocalTransport(tmp_path / "host")


def stage(t: LocalTransport, ds: Any, scene: str = "lego", progress: Any = None) -> str:
    return stage_dataset(t, ds, scene, python=sys.executable, payload_dir=str(REPO), progress=progress,
                         tuning=TUNING)


def test_mirrored_dataset_staged_with_progress_then_cached(transport: LocalTransport, scene_dir: Path) -> None:
    archive = zip_dir(scene_dir, "nerf_synthetic/lego")
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=500_000)) as m:
        ds = dataset("nerf", [m.url("/ns.zip")])
        seen: list[tuple[str, int, int | None]] = []
        path = stage(transport, ds, progress=lambda msg, done, total: seen.append((msg, done, total)))
        key = dataset_key(ds, content_key)
        assert path == f"{transport.root}/cache/datasets/{key}/lego"
        assert (Path(path) / "transforms_train.json").is_file()
        downloads = [s for s in seen if "downloading" in s[0]]
        assert downloads and all(total == len(archive) for _, _, total in downloads)
        assert 0 < downloads[0][1] <= len(archive) and "MB/s" in downloads[0][0]
        n_requests = len(m.requests)
        logs_before = sorted(Path(path).parent.glob(".stage-*.log"))
        assert stage(transport, ds) == path
        assert len(m.requests) == n_requests                                  # nothing downloaded
        assert sorted(Path(path).parent.glob(".stage-*.log")) == logs_before  # nothing even started


def test_fake_dataset_raises_dataset_invalid_one_line(transport: LocalTransport, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "lego"
    (fake / "renders").mkdir(parents=True)
    (fake / "renders" / "r_0.png").write_bytes(os.urandom(500))
    (fake / "metrics.csv").write_text("frame,psnr,ssim\n")
    with MirrorServer({"/lego.zip": zip_dir(fake, "lego")}) as hub:
        with pytest.raises(DatasetInvalid) as err:
            stage(transport, dataset("hubcopy", [hub.url("/lego.zip")]))
    msg = str(err.value)
    assert "\n" not in msg and "results-only" in msg and "'hubcopy'" in msg
    assert err.value.hint and "nothing was trained" in err.value.hint


def test_unreachable_mirrors_fall_back_to_uploading_the_local_tree(transport: LocalTransport, scene_dir: Path) -> None:
    with MirrorServer({}, MirrorBehaviour(status=503)) as down:
        ds = dataset("nerf", [down.url("/ns.zip"), f"file://{scene_dir.parent}"])
        seen: list[str] = []
        path = stage(transport, ds, progress=lambda msg, done, total: seen.append(msg))
        assert [r.status for r in down.requests] == [503]                    # one probe, then upload
    assert (Path(path) / "padding.bin").read_bytes() == (scene_dir / "padding.bin").read_bytes()
    assert any("uploading" in s for s in seen)
    assert (Path(path).parent / ".complete-lego").is_file()


def test_local_archive_only_is_uploaded_and_extracted(transport: LocalTransport, scene_dir: Path, tmp_path: Path) -> None:
    arc = tmp_path / "ns.zip"
    arc.write_bytes(zip_dir(scene_dir, "nerf_synthetic/lego"))
    path = stage(transport, dataset("nerf", [f"file://{arc}"]))
    assert (Path(path) / "transforms_test.json").is_file()
    assert not list(Path(path).parent.glob(".upload/*/ns.zip"))            # consumed by extraction


def test_nothing_works_is_one_staging_error(transport: LocalTransport, tmp_path: Path) -> None:
    with MirrorServer({}, MirrorBehaviour(status=404)) as down:
        url = down.url("/ns.zip")
        with pytest.raises(StagingError) as err:
            stage(transport, dataset("nerf", [url, f"file://{tmp_path}/missing"]))
    msg = str(err.value)
    assert "no copy of scene 'lego'" in msg and "does not exist on this machine" in msg and "\n" not in msg
    with pytest.raises(StagingError, match="no mirror answered") as err2:
        stage(transport, dataset("nerf", [url]))
    assert not isinstance(err2.value, DatasetInvalid)


def test_checksums_make_the_cache_key_independent_of_mirrors() -> None:
    sha = {"ns.zip": "a" * 64}
    a = dataset("x", ["https://a/ns.zip"], sha256=sha)
    b = dataset("x", ["https://b/ns.zip", "file:///d/ns.zip"], sha256=sha)
    assert dataset_key(a, content_key) == dataset_key(b, content_key)
    assert dataset_key(dataset("x", ["https://a/ns.zip"]), content_key) != \
        dataset_key(dataset("x", ["https://b/ns.zip"]), content_key)


def test_estimate_uses_head_local_size_or_assumption(scene_dir: Path, tmp_path: Path) -> None:
    body = os.urandom(3_000_000)
    with MirrorServer({"/big.zip": body}) as m:
        secs, source = estimate_staging_seconds(dataset("e", [m.url("/big.zip")]), rate_bytes_per_s=1e6)
        assert (secs, source) == (3.0, "head")
        assert [r.method for r in m.requests] == ["HEAD"]
        dead = m.url("/missing.zip")
        assert estimate_staging_seconds(dataset("e", [dead]), rate_bytes_per_s=2e6) == (ASSUMED_SIZE_BYTES / 2e6, "assumption")
    arc = tmp_path / "local.zip"
    arc.write_bytes(body[:1_000_000])
    assert estimate_staging_seconds(dataset("e", [f"file://{arc}"]), rate_bytes_per_s=1e6) == (1.0, "local")
    secs, source = estimate_staging_seconds(dataset("e", []))
    assert source == "assumption" and secs == ASSUMED_SIZE_BYTES / ASSUMED_RATE_BYTES_PER_S


def test_a_killed_host_process_is_reported_not_waited_for(transport: LocalTransport, scene_dir: Path) -> None:
    import signal
    import threading
    import time as _time
    archive = zip_dir(scene_dir, "nerf_synthetic/lego")
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=200_000)) as m:
        ds = dataset("nerf", [m.url("/ns.zip")])
        killed: list[int] = []

        def kill_when_downloading() -> None:   # plays the OOM killer on the stage process group
            deadline = _time.monotonic() + 20
            while _time.monotonic() < deadline and not killed:
                for log in Path(transport.root).glob("cache/datasets/*/.stage-lego-*.log"):
                    if '"phase":"download"' in log.read_text():
                        marker = str(log.with_suffix(".json")).encode()
                        for proc in Path("/proc").glob("[0-9]*"):
                            try:
                                if marker in (proc / "cmdline").read_bytes():
                                    os.kill(int(proc.name), signal.SIGKILL)
                                    killed.append(int(proc.name))
                            except (OSError, ProcessLookupError):
                                pass
                _time.sleep(0.1)

        th = threading.Thread(target=kill_when_downloading)
        th.start()
        t0 = _time.monotonic()
        with pytest.raises(StagingError, match="ended without an exit code"):
            stage(transport, ds)
        th.join(timeout=30)
        assert killed and _time.monotonic() - t0 < 15


def test_preflight_rejects_hopeless_declarations_before_renting(scene_dir: Path, tmp_path: Path) -> None:
    from orchestrator.staging.preflight import preflight
    preflight(dataset("ok", ["https://m/ns.zip", "s3://b/k.zip", "hf://datasets/o/n/f.zip", f"file://{scene_dir.parent}"]),
              ["lego"])
    preflight(dataset("local", [f"file://{scene_dir.parent}"]), ["lego"])
    cases = [
        (dataset("x", ["ftp://m/ns.zip"]), [], "unsupported scheme 'ftp'"),
        (dataset("x", ["mirror.example/ns.zip"]), [], "is not a URL"),
        (dataset("x", ["s3://bucket"]), [], "needs s3://bucket/key"),
        (dataset("x", []), [], "declares neither mirrors nor generate"),
        (dataset("x", ["https://m/ns.zip"], sha256={"ns.zip": "abc"}), [], "must be 64 hex digits"),
        (dataset("x", [f"file://{scene_dir.parent}"]), ["chair"], "no local copy of scene 'chair'"),
        (dataset("x", [f"file://{tmp_path}/nope.zip"]), ["lego"], "no local copy of scene 'lego'"),
    ]
    for ds, scenes, message in cases:
        with pytest.raises(StagingError, match=message) as err:
            preflight(ds, scenes)
        assert "\n" not in str(err.value)


BARE_PYTHON = "/usr/bin/python3"     # the distribution's python: no numpy, no PIL, no torch


@pytest.mark.skipif(not Path(BARE_PYTHON).is_file(), reason="no /usr/bin/python3 to stand in for a bare host")
def test_prefetch_with_a_bare_python_downloads_and_staging_then_only_validates(transport: LocalTransport,
                                                                               scene_dir: Path) -> None:
    bare = subprocess.run([BARE_PYTHON, "-c", "import numpy"], capture_output=True)
    assert bare.returncode != 0, "the stand-in for a bare host has numpy"
    archive = zip_dir(scene_dir, "nerf_synthetic/lego")
    with MirrorServer({"/ns.zip": archive}) as m:
        ds = dataset("nerf", [m.url("/ns.zip")])
        assert prefetch_dataset(transport, ds, "lego", python=BARE_PYTHON, payload_dir=str(REPO))
        dest = Path(transport.root) / "cache" / "datasets" / dataset_key(ds, content_key)
        assert (dest / "lego" / "transforms_train.json").is_file()
        assert not (dest / ".complete-lego").exists()          # fetched, not validated
        fetched = len(m.gets("/ns.zip"))
        assert fetched >= 1
        path = stage(transport, ds)                             # the environment's python validates
        assert path == str(dest / "lego") and (dest / ".complete-lego").is_file()
        assert len(m.gets("/ns.zip")) == fetched                 # nothing downloaded again
        assert not prefetch_dataset(transport, ds, "lego", python=BARE_PYTHON, payload_dir=str(REPO))  # cached


def test_prefetch_is_best_effort_and_cancellable(transport: LocalTransport, scene_dir: Path) -> None:
    archive = zip_dir(scene_dir, "nerf_synthetic/lego")
    assert not prefetch_dataset(transport, dataset("gen", [], generate=GenerateSpec(size=16)), "lego",
                                python=sys.executable, payload_dir=str(REPO))    # generated: nothing to fetch
    assert not prefetch_dataset(transport, dataset("nerf", ["http://127.0.0.1:9/ns.zip"]), "lego",
                                python=sys.executable, payload_dir=str(REPO))    # no mirror answers: False
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=100_000)) as m:
        ds = dataset("nerf", [m.url("/ns.zip")])
        stop = threading.Event()
        threading.Timer(1.5, stop.set).start()
        assert not prefetch_dataset(transport, ds, "lego", python=sys.executable, payload_dir=str(REPO), stop=stop)
        dest = Path(transport.root) / "cache" / "datasets" / dataset_key(ds, content_key)
        assert not (dest / "lego").exists() and not (dest / ".complete-lego").exists()
