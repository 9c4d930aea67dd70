"""How long staging a dataset will take, for `orchestrate estimate` (before anything is rented).

Size comes from the cheapest reliable source: a HEAD request's Content-Length on the first
http(s)/s3/hf mirror (3 s timeout), else the size of a file:// copy on this machine, else an
assumed size. The rate is the caller's (measured, e.g. from the ledger) or an assumed one.
"""
from __future__ import annotations

import functools
import logging
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from .mirrored import is_local_mirror, local_path

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)

ASSUMED_RATE_BYTES_PER_S = 20e6          # assumption: a decent mirror seen from a cloud GPU host
ASSUMED_UPLOAD_BYTES_PER_S = 5e6         # assumption: a home/office uplink pushing a file:// copy
ASSUMED_SIZE_BYTES = 250e6               # assumption: one NeRF-synthetic scene archive is ~0.1-0.3 GB
GENERATE_SECONDS_PER_MEGAPIXEL = 12.0    # measured here: 128 views of 64x64 (0.52 MPix) took ~6 s on one CPU core
HEAD_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=64)
def _head_size(url: str) -> int | None:
    from remote_payload.stage.sources import resolve  # stdlib only; shared with the host

    try:
        src = resolve(url, "")
    except Exception:  # noqa: BLE001 - an unusable URL only means "size unknown" here
        return None
    if src is None or src.kind != "archive":
        return None
    req = urllib.request.Request(src.url, method="HEAD", headers={"User-Agent": "orchestrate-estimate/1"})
    try:
        with urllib.request.urlopen(req, timeout=HEAD_TIMEOUT_S) as resp:   # noqa: S310
            length = resp.headers.get("Content-Length")
            return int(length) if length and int(length) > 0 else None
    except (OSError, ValueError, urllib.error.URLError) as exc:
        log.debug("HEAD %s failed: %s", src.display, exc)
        return None


def _local_size(url: str) -> int | None:
    path = local_path(url)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def estimate_staging_seconds(dataset_cfg: DatasetConfig, rate_bytes_per_s: float | None = None,
                             ) -> tuple[float, str]:
    """Return (seconds, source) for staging one scene of `dataset_cfg` on a host without a cache.

    source: "generate" (made on the host), "head" (size from the mirror), "local" (size of the
    file:// copy, uploaded at the upload rate) or "assumption" (size assumed).
    """
    gen = dataset_cfg.generate
    if gen is not None:
        views = 128
        mpix = views * gen.size * gen.size / 1e6
        return max(2.0, mpix * GENERATE_SECONDS_PER_MEGAPIXEL), "generate"
    scenes = list(dataset_cfg.scenes or [])
    scene = scenes[0] if scenes else "scene"
    mirrors = [m.replace("{scene}", scene) for m in (dataset_cfg.mirrors or ())]
    for m in mirrors:
        if not is_local_mirror(m):
            size = _head_size(m)
            if size is not None:
                return size / (rate_bytes_per_s or ASSUMED_RATE_BYTES_PER_S), "head"
    for m in mirrors:
        if is_local_mirror(m):
            size = _local_size(m)
            if size is not None:
                if all(is_local_mirror(x) for x in mirrors):
                    return size / (rate_bytes_per_s or ASSUMED_UPLOAD_BYTES_PER_S), "local"
                return size / (rate_bytes_per_s or ASSUMED_RATE_BYTES_PER_S), "local"
    return ASSUMED_SIZE_BYTES / (rate_bytes_per_s or ASSUMED_RATE_BYTES_PER_S), "assumption"


__all__ = ["estimate_staging_seconds", "ASSUMED_RATE_BYTES_PER_S", "ASSUMED_SIZE_BYTES"]
