"""Host-side staging against real HTTP mirrors on loopback (orchestrator.staging.mirror_server)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from orchestrator.staging.mirror_server import MirrorBehaviour, MirrorServer
from remote_payload.stage.cli import stage
from remote_payload.stage.errors import BadData
from remote_payload.stage.extract import extract
from remote_payload.stage.fetch import FetchPolicy

REPO = Path(__file__).resolve().parents[1]
FAST = FetchPolicy(probe_bytes=64 * 1024, probe_timeout_s=3.0, stall_floor_bytes_per_s=64 * 1024,
                   stall_period_s=1.0)
PAD_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny valid NeRF-synthetic scene named lego, padded with incompressible bytes so that
    archives are big enough (~3 MB) to stall or cut mid-file."""
    from ngp_train.synth import generate_scene
    d = generate_scene(tmp_path_factory.mktemp("src") / "lego", size=16, n_train=4, n_val=1, n_test=2)
    (d / "padding.bin").write_bytes(os.urandom(PAD_BYTES))
    return d


def zip_dir(root: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, f"{prefix}/{p.relative_to(root)}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive(scene_dir: Path) -> bytes:
    return zip_dir(scene_dir, "nerf_synthetic/lego")


@pytest.fixture(scope="module")
def fake_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """What a hub sometimes serves as a 'dataset': rendered results, metrics, a snapshot."""
    d = tmp_path_factory.mktemp("fake") / "lego"
    (d / "renders").mkdir(parents=True)
    for k in range(3):
        (d / "renders" / f"r_{k}.png").write_bytes(os.urandom(2000))
    (d / "metrics.csv").write_text("frame,psnr,ssim\nr_0,33.1,0.97\n")
    (d / "summary.json").write_text(json.dumps({"psnr": 33.1}))
    return zip_dir(d, "lego")


def events() -> tuple[list[dict], object]:
    out: list[dict] = []
    return out, out.append


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "remote_payload", "stage", *args], capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=REPO)


def download_gets(server: MirrorServer, path: str) -> list:
    """GETs that are downloads, not probes (a probe asks for a closed range bytes=0-N)."""
    return [r for r in server.gets(path) if r.range is None or r.range.endswith("-")]


def test_picks_the_fast_mirror_over_a_throttled_one(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=400_000)) as slow, \
            MirrorServer({"/ns.zip": archive}) as good:
        out, emit = events()
        scene = stage(tmp_path / "ds", "lego", [slow.url("/ns.zip"), good.url("/ns.zip")], {},
                      policy=FAST, timeout_s=60, emit=emit)
        assert (scene / "transforms_train.json").is_file()
        assert download_gets(slow, "/ns.zip") == []               # only probed
        assert [r.range for r in slow.gets()] == [f"bytes=0-{FAST.probe_bytes - 1}"]
        full = download_gets(good, "/ns.zip")
        assert [r.range for r in full] == ["bytes=0-"] and full[0].bytes_sent == len(archive)
    probes = {e["mirror"]: e for e in out if e["event"] == "probe"}
    assert probes[good.url("/ns.zip")]["rate_bytes_per_s"] > 2 * probes[slow.url("/ns.zip")]["rate_bytes_per_s"]
    assert probes[good.url("/ns.zip")]["total_bytes"] == len(archive)
    done = out[-1]
    assert done["event"] == "done" and done["cached"] is False and done["mirror"] == good.url("/ns.zip")
    assert done["bytes"] == len(archive)
    assert any(e["event"] == "progress" and e["phase"] == "download" for e in out)


def test_stall_fails_over_and_resumes_from_the_byte_reached(tmp_path: Path, archive: bytes) -> None:
    stall_at = 1_000_000
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(stall_at_byte=stall_at)) as stalling, \
            MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=2_500_000)) as good:
        out, emit = events()
        scene = stage(tmp_path / "ds", "lego", [good.url("/ns.zip"), stalling.url("/ns.zip")],
                      {"ns.zip": hashlib.sha256(archive).hexdigest()}, policy=FAST, timeout_s=60, emit=emit)
        # the unthrottled stalling mirror probes faster, so it is tried first and stalls at stall_at
        first = download_gets(stalling, "/ns.zip")
        assert [r.range for r in first] == ["bytes=0-"] and first[0].bytes_sent == stall_at
        resumed = download_gets(good, "/ns.zip")
        assert [r.range for r in resumed] == [f"bytes={stall_at}-"]
        assert resumed[0].bytes_sent == len(archive) - stall_at
    assert (scene / "padding.bin").stat().st_size == PAD_BYTES
    fail = [e for e in out if e["event"] == "failover"]
    assert fail == [{"event": "failover", "mirror": stalling.url("/ns.zip"), "outcome": "stall", "at_byte": stall_at}]
    assert out[-1]["mirror"] == good.url("/ns.zip")


def test_truncated_body_is_detected_and_resumed_elsewhere(tmp_path: Path, archive: bytes) -> None:
    cut = 1_500_000
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(truncate_at_byte=cut)) as trunc, \
            MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=2_500_000)) as good:
        out, emit = events()
        stage(tmp_path / "ds", "lego", [trunc.url("/ns.zip"), good.url("/ns.zip")], {},
              policy=FAST, timeout_s=60, emit=emit)
        assert [r.range for r in download_gets(good, "/ns.zip")] == [f"bytes={cut}-"]
    assert [e["outcome"] for e in out if e["event"] == "failover"] == ["truncated"]


def test_only_a_truncating_mirror_exits_3(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(truncate_at_byte=500_000)) as trunc:
        res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", trunc.url("/ns.zip"),
                      "--stall-period-s", "0.5", "--probe-bytes", "65536")
        assert len(download_gets(trunc, "/ns.zip")) == 2          # cut, then a resume that brings nothing
    assert res.returncode == 3, res.stderr
    assert "truncated at byte 500000" in res.stderr and "Traceback" not in res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["event"] == "error" and last["exit_code"] == 3
    assert (tmp_path / "ds" / ".download" / "ns.zip.part").stat().st_size == 500_000   # kept for a resume


def test_results_only_dataset_is_rejected_with_one_line(tmp_path: Path, fake_archive: bytes) -> None:
    with MirrorServer({"/lego.zip": fake_archive}) as hub:
        res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", hub.url("/lego.zip"))
    assert res.returncode == 2
    line = res.stderr.strip()
    assert "\n" not in line and "results-only" in line and "lego" in line
    assert not (tmp_path / "ds" / ".complete-lego").exists()


def test_second_staging_makes_zero_requests(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive}) as a, MirrorServer({"/ns.zip": archive}) as b:
        mirrors = [a.url("/ns.zip"), b.url("/ns.zip")]
        first = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", *sum((["--mirror", m] for m in mirrors), []))
        assert first.returncode == 0, first.stderr
        n_before = len(a.requests) + len(b.requests)
        assert n_before >= 3
        second = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", *sum((["--mirror", m] for m in mirrors), []))
        assert second.returncode == 0
        assert len(a.requests) + len(b.requests) == n_before
    done = json.loads(second.stdout.strip().splitlines()[-1])
    assert done == {"event": "done", "scene_dir": str(tmp_path / "ds" / "lego"), "cached": True, "bytes": 0,
                    "seconds": 0.0, "rate_bytes_per_s": 0.0, "mirror": None}


def test_other_scene_of_an_extracted_archive_needs_no_download(tmp_path: Path, scene_dir: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("lego", "chair"):
            for p in sorted(scene_dir.rglob("*")):
                if p.is_file() and p.name != "padding.bin":
                    zf.write(p, f"nerf_synthetic/{name}/{p.relative_to(scene_dir)}")
    with MirrorServer({"/ns.zip": buf.getvalue()}) as m:
        _, emit = events()
        stage(tmp_path / "ds", "lego", [m.url("/ns.zip")], {}, policy=FAST, timeout_s=60, emit=emit)
        n = len(m.requests)
        chair = stage(tmp_path / "ds", "chair", [m.url("/ns.zip")], {}, policy=FAST, timeout_s=60, emit=emit)
        assert len(m.requests) == n
        assert chair == tmp_path / "ds" / "chair" and (chair / "transforms_test.json").is_file()
        with pytest.raises(BadData, match=r"scene 'ship' is not in the dataset \(it holds: .*\)"):
            stage(tmp_path / "ds", "ship", [m.url("/ns.zip")], {}, policy=FAST, timeout_s=60, emit=emit)
        assert len(m.requests) == n


def test_checksum_mismatch_is_bad_data(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive}) as m:
        _, emit = events()
        with pytest.raises(BadData, match="ns.zip: sha256 .* does not match"):
            stage(tmp_path / "ds", "lego", [m.url("/ns.zip")], {"ns.zip": "0" * 64}, policy=FAST,
                  timeout_s=60, emit=emit)
    assert not (tmp_path / "ds" / "lego").exists()


def test_per_scene_tree_mirror(tmp_path: Path, scene_dir: Path) -> None:
    files = {f"/trees/lego/{p.relative_to(scene_dir)}": p.read_bytes()
             for p in scene_dir.rglob("*") if p.is_file() and p.name != "padding.bin"}
    with MirrorServer(files) as m:
        _, emit = events()
        scene = stage(tmp_path / "ds", "lego", [m.url("/trees/")], {}, policy=FAST, timeout_s=60, emit=emit)
        n_images = len(list(scene_dir.glob("*/*.png")))
        assert len(download_gets(m, None)) == 3 + n_images     # 3 transforms + every frame, nothing else
    assert sorted(p.name for p in (scene / "train").iterdir()) == sorted(p.name for p in (scene_dir / "train").iterdir())


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, archive: bytes) -> None:
    dest = tmp_path / "ds"
    part = dest / ".download" / "ns.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not survive")
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(ignore_range=True)) as m:
        _, emit = events()
        stage(dest, "lego", [m.url("/ns.zip")], {"ns.zip": hashlib.sha256(archive).hexdigest()},
              policy=FAST, timeout_s=60, emit=emit)
        assert [r.status for r in m.gets()] == [200, 200]


def test_hf_and_s3_mirrors_resolve_to_http(tmp_path: Path, archive: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with MirrorServer({"/datasets/me/nerf/resolve/v1/ns.zip": archive, "/bucket/data/ns.zip": archive}) as m:
        monkeypatch.setenv("HF_ENDPOINT", m.url(""))
        monkeypatch.setenv("AWS_ENDPOINT_URL", m.url(""))
        _, emit = events()
        stage(tmp_path / "a", "lego", ["hf://datasets/me/nerf@v1/ns.zip"], {}, policy=FAST, timeout_s=60, emit=emit)
        stage(tmp_path / "b", "lego", ["s3://bucket/data/ns.zip"], {}, policy=FAST, timeout_s=60, emit=emit)
        assert {r.path for r in download_gets(m, None)} == {"/datasets/me/nerf/resolve/v1/ns.zip",
                                                              "/bucket/data/ns.zip"}


def test_no_reachable_mirror_exits_3_naming_each(tmp_path: Path) -> None:
    with MirrorServer({}, MirrorBehaviour(status=503)) as down:
        url = down.url("/ns.zip")
    res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", url,
                  "--mirror", "file:///home/me/ns.zip", "--probe-timeout-s", "1")
    assert res.returncode == 3
    assert res.stderr.strip().startswith("no mirror answered") and "127.0.0.1" in res.stderr
    res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", "file:///home/me/ns.zip")
    assert res.returncode == 3 and "only file:// mirrors" in res.stderr
    res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", "ftp://x/ns.zip")
    assert res.returncode == 1 and "unsupported scheme 'ftp'" in res.stderr


# ---- safe extraction -------------------------------------------------------------------------

def _tar(path: Path, entries: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in entries:
            data = b"x" * info.size if info.isfile() else None
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _dev(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("entries, reason", [
    ([_file("ok/a.txt"), _file("../escape.txt")], "contains '..'"),
    ([_file("ok/../../escape.txt")], "contains '..'"),
    ([_file("/tmp/escape-abs.txt")], "absolute path"),
    ([_link("ok/etc", "/etc")], "absolute path"),
    ([_link("ok/up", "../../outside")], "points outside"),
    ([_link("ok/hard", "../outside", tarfile.LNKTYPE)], "points outside"),
    ([_dev("ok/null")], "device or FIFO"),
])
def test_unsafe_tar_is_refused_before_writing_anything(tmp_path: Path, entries: list, reason: str) -> None:
    arc = _tar(tmp_path / "evil.tar.gz", entries)
    dest = tmp_path / "out" / "tree"
    with pytest.raises(BadData, match=reason):
        extract(arc, dest)
    assert list(dest.rglob("*")) == []
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "escape.txt").exists()


@pytest.mark.parametrize("name, link_target, reason", [
    ("../escape.txt", None, "contains '..'"),
    ("/abs/escape.txt", None, "absolute path"),
    ("ok/link", "../../outside", "points outside"),
    ("ok/link", "/etc/passwd", "absolute path"),
])
def test_unsafe_zip_is_refused(tmp_path: Path, name: str, link_target: str | None, reason: str) -> None:
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok/fine.txt", "fine")
        info = zipfile.ZipInfo(name)
        if link_target is not None:
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, link_target)
        else:
            zf.writestr(info, "evil")
    dest = tmp_path / "out"
    with pytest.raises(BadData, match=reason):
        extract(arc, dest)
    assert list(dest.rglob("*")) == []


def test_safe_archive_with_inner_symlink_extracts(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "ok.tar.gz", [_file("scene/train/r_0.png"), _link("scene/alias", "train/r_0.png")])
    assert extract(arc, tmp_path / "out") == 2
    assert (tmp_path / "out" / "scene" / "alias").read_bytes() == b"xxx"


def test_unsafe_archive_from_a_mirror_exits_2(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "evil.tar.gz", [_file("lego/a.txt"), _file("../../pwned.txt")])
    with MirrorServer({"/evil.tar.gz": arc.read_bytes()}) as m:
        res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", m.url("/evil.tar.gz"))
    assert res.returncode == 2 and "refusing to extract" in res.stderr
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "ds" / "lego").exists()


def test_concurrent_stagings_of_one_dataset_download_once(tmp_path: Path, archive: bytes) -> None:
    import threading
    with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=6_000_000)) as m:
        results: list[Path] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                results.append(stage(tmp_path / "ds", "lego", [m.url("/ns.zip")], {}, policy=FAST,
                                     timeout_s=60, emit=lambda e: None))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert errors == [] and results == [tmp_path / "ds" / "lego"] * 2
        assert len(download_gets(m, "/ns.zip")) == 1


def test_a_part_file_left_by_an_earlier_run_is_resumed(tmp_path: Path, archive: bytes) -> None:
    dest = tmp_path / "ds"
    part = dest / ".download" / "ns.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:1_234_567])
    with MirrorServer({"/ns.zip": archive}) as m:
        stage(dest, "lego", [m.url("/ns.zip")], {"ns.zip": hashlib.sha256(archive).hexdigest()},
              policy=FAST, timeout_s=60, emit=lambda e: None)
        assert [(r.range, r.bytes_sent) for r in download_gets(m, "/ns.zip")] == \
            [("bytes=1234567-", len(archive) - 1_234_567)]


def test_per_file_checksums_are_checked(tmp_path: Path, archive: bytes, scene_dir: Path) -> None:
    good = hashlib.sha256((scene_dir / "transforms_train.json").read_bytes()).hexdigest()
    with MirrorServer({"/ns.zip": archive}) as m:
        stage(tmp_path / "a", "lego", [m.url("/ns.zip")], {"lego/transforms_train.json": good},
              policy=FAST, timeout_s=60, emit=lambda e: None)
        with pytest.raises(BadData, match=r"lego/train/r_0.png: sha256 .* does not match"):
            stage(tmp_path / "b", "lego", [m.url("/ns.zip")], {"lego/train/r_0.png": "f" * 64},
                  policy=FAST, timeout_s=60, emit=lambda e: None)
    assert not (tmp_path / "b" / ".complete-lego").exists()


def test_credentials_in_a_mirror_url_never_reach_the_output(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive}) as m:
        secret_url = m.url("/ns.zip").replace("http://", "http://user:hunter2pw@") + "?X-Amz-Signature=s3cr3tsig"
        res = run_cli("--dest", str(tmp_path / "ds"), "--scene", "lego", "--mirror", secret_url, "-v")
        assert res.returncode == 0, res.stderr
        import base64
        last = m.gets("/ns.zip")[-1]
        assert last.range == "bytes=0-"
        assert last.authorization == "Basic " + base64.b64encode(b"user:hunter2pw").decode()
    text = res.stdout + res.stderr + "".join(p.read_text(errors="replace") for p in (tmp_path / "ds").glob(".complete-*"))
    assert "hunter2pw" not in text and "s3cr3tsig" not in text
    assert json.loads(res.stdout.splitlines()[-1])["mirror"] == m.url("/ns.zip")


def test_hf_token_goes_to_the_hub_but_not_to_the_redirect_target(tmp_path: Path, archive: bytes,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with MirrorServer({"/ns.zip": archive}) as cdn, \
            MirrorServer({}, redirects={"/datasets/me/nerf/resolve/main/ns.zip": cdn.url("/ns.zip")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url(""))
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
        scene = stage(tmp_path / "ds", "lego", ["hf://datasets/me/nerf/ns.zip"], {}, policy=FAST,
                      timeout_s=60, emit=lambda e: None)
        assert (scene / "transforms_train.json").is_file()
        assert {r.authorization for r in hub.requests} == {"Bearer hf_secret_token_123"}
        assert [r.status for r in hub.requests] == [302, 302]            # probe, download
        assert {r.authorization for r in cdn.requests} == {None}
        assert [r.range for r in download_gets(cdn, "/ns.zip")] == ["bytes=0-"]


def test_per_scene_archives_via_placeholder(tmp_path: Path, scene_dir: Path) -> None:
    small = {f"/{name}.zip": zip_dir(scene_dir, name) for name in ("lego", "chair")}
    with MirrorServer(small) as m:
        for name in ("lego", "chair"):
            got = stage(tmp_path / "ds", name, [m.url("/{scene}.zip")], {}, policy=FAST, timeout_s=60,
                        emit=lambda e: None)
            assert got == tmp_path / "ds" / name and (got / "padding.bin").is_file()
        assert sorted(r.path for r in download_gets(m, None)) == ["/chair.zip", "/lego.zip"]


def test_a_mirror_holding_a_shorter_copy_is_dropped(tmp_path: Path, archive: bytes) -> None:
    with MirrorServer({"/ns.zip": archive[:-4096]}) as short, \
            MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=4_000_000)) as good:
        out, emit = events()
        stage(tmp_path / "ds", "lego", [short.url("/ns.zip"), good.url("/ns.zip")], {}, policy=FAST,
              timeout_s=60, emit=emit)
        assert download_gets(short, "/ns.zip") == []              # probed (faster!) but never used
        assert [r.range for r in download_gets(good, "/ns.zip")] == ["bytes=0-"]
    probes = {e["mirror"]: e["total_bytes"] for e in out if e["event"] == "probe"}
    assert probes == {short.url("/ns.zip"): len(archive) - 4096, good.url("/ns.zip"): len(archive)}
