"""Probing mirrors and resumable downloads with stall detection and fail-over (stdlib only).

A download writes into `<file>.part`; every attempt resumes from the bytes already on disk
with `Range: bytes=<offset>-`, so failing over to another mirror after a stall or a cut
connection continues where the previous one stopped instead of starting again.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NoMirror
from .sources import Source

log = logging.getLogger(__name__)

# on_progress(done_bytes, total_bytes_or_None, rate_bytes_per_s, mirror_url)
ProgressFn = Callable[[int, "int | None", float, str], None]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    probe_bytes: int = 256 * 1024
    probe_timeout_s: float = 5.0
    stall_floor_bytes_per_s: float = 32 * 1024   # slower than this for stall_period_s = stalled
    stall_period_s: float = 15.0
    chunk_bytes: int = 1024 * 1024
    max_rounds: int = 3                          # passes over the mirror list while bytes still arrive


@dataclass(frozen=True, slots=True)
class Probe:
    source: Source
    ok: bool
    rate_bytes_per_s: float
    total_bytes: int | None
    latency_s: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    url: str
    start_byte: int
    end_byte: int
    seconds: float
    outcome: str          # "complete" | "stall" | "truncated" | "error: ..."


@dataclass(frozen=True, slots=True)
class Download:
    path: Path
    total_bytes: int
    fetched_bytes: int    # bytes transferred in this call (excludes a resumed .part)
    seconds: float
    attempts: tuple[Attempt, ...]

    @property
    def rate_bytes_per_s(self) -> float:
        return self.fetched_bytes / self.seconds if self.seconds > 0 else 0.0


class _MirrorFailed(Exception):
    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _open(source: Source, start: int, end: int | None, timeout_s: float) -> http.client.HTTPResponse:
    req = urllib.request.Request(source.url, headers={"User-Agent": "orchestrate-stage/1",
                                                      "Accept-Encoding": "identity"})
    req.add_header("Range", f"bytes={start}-{'' if end is None else end}")
    for key, value in source.private_headers.items():
        req.add_unredirected_header(key, value)   # never forwarded to a redirect target
    return urllib.request.urlopen(req, timeout=timeout_s)   # noqa: S310 (schemes checked in sources)


def _total_of(resp: http.client.HTTPResponse) -> int | None:
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
    if m and m.group(3) != "*":
        return int(m.group(3))
    if resp.status == 200 and resp.headers.get("Content-Length"):
        return int(resp.headers["Content-Length"])
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def probe(source: Source, policy: FetchPolicy) -> Probe:
    """Read the first `probe_bytes` of `source` and measure the rate (connection set-up included)."""
    t0 = time.monotonic()
    deadline = t0 + policy.probe_timeout_s
    got = 0
    try:
        with _open(source, 0, policy.probe_bytes - 1, policy.probe_timeout_s) as resp:
            latency = time.monotonic() - t0
            total = _total_of(resp)
            read1 = getattr(resp, "read1", resp.read)
            while got < policy.probe_bytes and time.monotonic() < deadline:
                chunk = read1(min(65536, policy.probe_bytes - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Probe(source, False, 0.0, None, time.monotonic() - t0, _describe(exc))
    elapsed = max(time.monotonic() - t0, 1e-6)
    if got == 0:
        return Probe(source, False, 0.0, total, latency, "no data")
    return Probe(source, True, got / elapsed, total, latency)


def rank(probes: list[Probe]) -> tuple[list[Probe], int | None]:
    """Working mirrors fastest first, and the size they agree on (majority, ties to the largest).

    A mirror reporting another size holds a different (often truncated) copy and is dropped.
    """
    ok = [p for p in probes if p.ok]
    sizes = [p.total_bytes for p in ok if p.total_bytes is not None]
    total = max(set(sizes), key=lambda s: (sizes.count(s), s)) if sizes else None
    keep = [p for p in ok if total is None or p.total_bytes in (None, total)]
    return sorted(keep, key=lambda p: -p.rate_bytes_per_s), total


def _attempt(source: Source, part: Path, total: int | None, policy: FetchPolicy,
             deadline: float, on_chunk: Callable[[int], None]) -> int | None:
    """Append to `part` from `source` until complete; return the total size. Raises _MirrorFailed."""
    offset = part.stat().st_size if part.exists() else 0
    if total is not None and offset >= total:
        return total
    try:
        resp = _open(source, offset, None, policy.stall_period_s)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _MirrorFailed(f"error: {_describe(exc)}") from None
    with resp, open(part, "ab") as fh:
        if resp.status == 200 and offset > 0:          # the mirror ignored Range: start over
            fh.truncate(0)
            fh.seek(0)
            offset = 0
        elif resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:
                raise _MirrorFailed(f"error: answered range {resp.headers.get('Content-Range')!r} "
                                    f"for bytes={offset}-")
        seen_total = _total_of(resp)
        if total is not None and seen_total is not None and seen_total != total:
            raise _MirrorFailed(f"error: size {seen_total} differs from {total}")
        total = total if total is not None else seen_total
        length = resp.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None else total
        read1 = getattr(resp, "read1", resp.read)
        window_t, window_bytes = time.monotonic(), 0
        while True:
            try:
                chunk = read1(policy.chunk_bytes)
            except TimeoutError:
                raise _MirrorFailed("stall") from None
            except (OSError, http.client.HTTPException) as exc:
                raise _MirrorFailed(f"error: {_describe(exc)}") from None
            if not chunk:
                break
            fh.write(chunk)
            on_chunk(len(chunk))
            window_bytes += len(chunk)
            now = time.monotonic()
            if now > deadline:
                raise _MirrorFailed("error: staging deadline reached")
            if now - window_t >= policy.stall_period_s:
                if window_bytes / (now - window_t) < policy.stall_floor_bytes_per_s:
                    raise _MirrorFailed("stall")
                window_t, window_bytes = now, 0
        fh.flush()
        end = fh.tell()
    if expected_end is not None and end < expected_end:
        raise _MirrorFailed("truncated")
    return total if total is not None else end


def download(sources: list[Source], dest: Path, *, total_bytes: int | None, policy: FetchPolicy,
             deadline: float, on_progress: ProgressFn | None = None,
             progress_interval_s: float = 0.5) -> Download:
    """Fetch one file from `sources` (best first) into `dest`, failing over and resuming.

    Raises NoMirror when every mirror failed (the .part file is kept for the next try).
    """
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fetched = 0
    attempts: list[Attempt] = []
    state: dict[str, Any] = {"last": 0.0, "url": ""}

    def on_chunk(n: int) -> None:
        nonlocal fetched
        fetched += n
        now = time.monotonic()
        if on_progress and now - state["last"] >= progress_interval_s:
            state["last"] = now
            done = part.stat().st_size if part.exists() else 0
            on_progress(done, total_bytes, fetched / max(now - t0, 1e-6), state["url"])

    for round_no in range(policy.max_rounds):
        before = fetched
        for src in sources:
            if time.monotonic() > deadline:
                break
            start = part.stat().st_size if part.exists() else 0
            a0 = time.monotonic()
            state["url"] = src.display
            try:
                total = _attempt(src, part, total_bytes, policy, deadline, on_chunk)
            except _MirrorFailed as exc:
                end = part.stat().st_size if part.exists() else 0
                attempts.append(Attempt(src.display, start, end, time.monotonic() - a0, exc.outcome))
                log.info("mirror %s: %s at byte %d; trying the next one", src.display, exc.outcome, end)
                continue
            end = part.stat().st_size
            attempts.append(Attempt(src.display, start, end, time.monotonic() - a0, "complete"))
            if total is not None and end != total:
                raise NoMirror(f"{dest.name}: got {end} bytes, expected {total}")
            os.replace(part, dest)
            seconds = time.monotonic() - t0
            if on_progress:
                on_progress(end, end, fetched / max(seconds, 1e-6), src.display)
            return Download(dest, end, fetched, seconds, tuple(attempts))
        if fetched == before or time.monotonic() > deadline:
            break
        log.info("round %d over the mirrors made progress; trying again", round_no + 1)
    reasons = "; ".join(f"{a.url}: {a.outcome} at byte {a.end_byte}" for a in attempts[-len(sources):])
    raise NoMirror(f"no mirror could deliver {dest.name} ({reasons or 'no mirrors'})")
