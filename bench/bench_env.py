"""The environment phase on a fresh host, uv against pip: `remote_payload env` from nothing.

A fresh host = empty work root and empty installer caches (UV_CACHE_DIR / PIP_NO_CACHE_DIR
point at new directories), the interpreter a venv holding only torch (a stock image's python).
Packages come from a package index on loopback over the CI wheelhouse
(orchestrator/testing/pypi.py; `.ci/run` fills it, or set ORCHESTRATE_TEST_WHEELHOUSE), never
from this machine's configured indexes: the figure is the installers' own work, not the network's. Run:

    PYTHONPATH=$PWD python bench/bench_env.py [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(installer: str, python: str, index_url: str) -> float:
    from orchestrator.testing.stockhost import index_env
    with tempfile.TemporaryDirectory(prefix="bench-env-") as tmp:
        env = {**os.environ, **index_env(index_url), "PYTHONPATH": str(ROOT),
               "ORCHESTRATE_PAYLOAD_INSTALLER": installer,
               "UV_CACHE_DIR": f"{tmp}/uv-cache", "PIP_NO_CACHE_DIR": "1"}
        t0 = time.monotonic()
        res = subprocess.run([python, "-m", "remote_payload", "env", "--root", f"{tmp}/root", "--python",
                              python, "--out", f"{tmp}/root/env.json"], env=env, capture_output=True,
                             text=True, timeout=900)
        took = time.monotonic() - t0
        if res.returncode != 0:
            raise SystemExit(f"{installer}: {res.stderr[-500:]}")
        rec = json.loads(res.stdout)["environment"]
        assert rec["installer"] == installer and not rec["reused"]
        return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--python", default=None, help="the host interpreter (default: the torch-only venv)")
    args = ap.parse_args()
    from orchestrator.testing.pypi import WHEELHOUSE_ENV, LocalIndex, wheelhouse_from_env
    from orchestrator.testing.stockhost import torch_only_python
    wheelhouse = wheelhouse_from_env()
    if wheelhouse is None:
        raise SystemExit(f"no wheelhouse: set {WHEELHOUSE_ENV} to a directory of wheels "
                         "(`bash .ci/run` fills .ci-wheelhouse/)")
    with LocalIndex(wheelhouse) as index:
        python = args.python or str(torch_only_python(index.url))
        for installer in ("uv", "pip"):
            times = [one(installer, python, index.url) for _ in range(args.repeat)]
            print(f"{installer}: median {statistics.median(times):.1f} s, "
                  f"runs {', '.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
