"""Benchmark: stage a few-hundred-MB dataset from a throttled loopback mirror.

    python bench/bench_staging.py [--size-mb 256] [--rate-mb-s 40] [--timeout-s 120]

Builds a valid NeRF-synthetic scene padded with incompressible bytes into an uncompressed zip,
serves it from `MirrorServer` with a token bucket at the configured rate, stages it through the
real controller path (LocalTransport → `remote_payload stage` detached → poll), and prints the
achieved download rate against the configured one (target ≥ 90%) plus the wall time. A second
staging of the same dataset must then make zero requests. Everything lives in a temp dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.staging import StageTuning, stage_dataset  # noqa: E402
from orchestrator.staging.mirror_server import MirrorBehaviour, MirrorServer  # noqa: E402
from orchestrator.transport.local import LocalTransport  # noqa: E402


class _Dataset:
    """The fields of config.DatasetConfig that staging reads (kept local so the bench has no YAML)."""

    def __init__(self, name: str, mirrors: list[str]) -> None:
        self.name, self.mirrors, self.generate, self.sha256, self.scenes = name, tuple(mirrors), None, {}, ("lego",)


def build_archive(work: Path, size_bytes: int) -> Path:
    from ngp_train.synth import generate_scene

    scene = generate_scene(work / "src" / "lego", size=16, n_train=4, n_val=1, n_test=2)
    arc = work / "nerf_bench.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(scene.rglob("*")):
            if p.is_file():
                zf.write(p, f"nerf_bench/lego/{p.relative_to(scene)}")
        block = 8 * 1024 * 1024
        for k in range(max(1, size_bytes // block)):   # incompressible "extra images"
            zf.writestr(f"nerf_bench/lego/extra/blob_{k:03d}.bin", os.urandom(block))
    return arc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--rate-mb-s", type=float, default=40)
    ap.add_argument("--timeout-s", type=float, default=120)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rate = args.rate_mb_s * 1e6
    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        arc = build_archive(work, int(args.size_mb * 1e6))
        size = arc.stat().st_size
        print(f"dataset: {size / 1e6:.1f} MB archive built in {time.monotonic() - t0:.1f} s")
        transport = LocalTransport(work / "host")
        with MirrorServer({"/nerf_bench.zip": arc}, MirrorBehaviour(rate_bytes_per_s=rate)) as mirror:
            ds = _Dataset("bench", [mirror.url("/nerf_bench.zip")])
            tuning = StageTuning(timeout_s=args.timeout_s)
            t1 = time.monotonic()
            scene_dir = stage_dataset(transport, ds, "lego", python=sys.executable, payload_dir=str(REPO),
                                      tuning=tuning)
            wall = time.monotonic() - t1
            n_requests = len(mirror.requests)
            t2 = time.monotonic()
            again = stage_dataset(transport, ds, "lego", python=sys.executable, payload_dir=str(REPO), tuning=tuning)
            cached_s = time.monotonic() - t2
            repeat_requests = len(mirror.requests) - n_requests
        logs = sorted(Path(scene_dir).parent.glob(".stage-lego-*.log"))
        done = [json.loads(line) for line in logs[-1].read_text().splitlines() if '"event":"done"' in line][-1]
        achieved = float(done["rate_bytes_per_s"])
        ok = achieved >= 0.9 * rate and repeat_requests == 0 and again == scene_dir
        print(f"configured mirror rate : {rate / 1e6:.1f} MB/s")
        print(f"achieved download rate : {achieved / 1e6:.1f} MB/s = {achieved / rate:.1%} of configured "
              f"(target >= 90%)")
        print(f"download time          : {done['seconds']:.2f} s on the host for {done['bytes'] / 1e6:.1f} MB "
              f"(extract + validate included)")
        print(f"staging wall time      : {wall:.2f} s (controller: start, poll, done) = "
              f"{size / wall / 1e6:.1f} MB/s end to end")
        print(f"second staging         : {cached_s * 1000:.0f} ms, {repeat_requests} requests to the mirror")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
