"""Mirrored datasets on the controller side: the host pulls, the controller watches and, when no
mirror is reachable from the host, uploads its own copy (a `file://` mirror).

The host runs `remote_payload stage` detached; it keeps its latest event in a small status file
that is polled (bytes, total, rate → the live view's progress bar with ETA), and writes its exit
code to `<status>.rc` when it ends. Everything lands in `<root>/cache/datasets/<key>/`, where a
`.complete-<scene>` marker makes any later staging of that scene a single file read.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from remote_payload.contract import EXIT_BAD_DATA

from ..errors import DatasetInvalid, StagingError
from ..secrets import redact
from .common import payload_cmd

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..transport.base import Transport

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, "int | None"], None]   # (message, done_bytes, total_bytes)
POLL_S = 0.5
_SEP = "--orchestrate-stage-rc--"


@dataclass(frozen=True, slots=True)
class StageTuning:
    """Knobs of the host-side downloader (defaults suit real mirrors; tests shorten them)."""
    timeout_s: float = 6 * 3600.0
    stall_period_s: float = 15.0
    stall_floor_bytes_per_s: float = 32 * 1024
    probe_bytes: int = 256 * 1024
    probe_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class HostStageResult:
    exit_code: int
    last_event: dict[str, Any]
    message: str


def is_local_mirror(url: str) -> bool:
    return url.lower().startswith("file://")


def local_path(url: str) -> Path:
    """`file:///abs/path`, `file://~/path` or `file://relative/path` → a path on the controller."""
    rest = url[len("file://"):]
    return Path(unquote(rest)).expanduser()


def dataset_key(dataset: DatasetConfig, content_key: Callable[[Any], str]) -> str:
    """Cache key: the declared checksums when there are any (the content), else the mirror set."""
    sha = dict(dataset.sha256 or {})
    if sha:
        return content_key({"kind": "mirrored", "sha256": sha})
    return content_key({"kind": "mirrored", "mirrors": sorted(dataset.mirrors or ())})


def _stage_args(dest: str, scene: str, mirrors: list[str], sha256: dict[str, str], tuning: StageTuning,
                status: str, from_local: str | None = None, fetch_only: bool = False) -> str:
    args = ["remote_payload", "stage", "--dest", dest, "--scene", scene, "--status-file", status,
            "--timeout-s", f"{tuning.timeout_s:g}", "--stall-period-s", f"{tuning.stall_period_s:g}",
            "--stall-floor-bytes-per-s", f"{tuning.stall_floor_bytes_per_s:g}",
            "--probe-bytes", str(tuning.probe_bytes), "--probe-timeout-s", f"{tuning.probe_timeout_s:g}"]
    for m in mirrors:
        args += ["--mirror", m]
    for k, v in sorted(sha256.items()):
        args += ["--sha256", f"{k}={v}"]
    if from_local:
        args += ["--from-local", from_local]
    if fetch_only:
        args.append("--fetch-only")
    return " ".join(shlex.quote(a) for a in args)


def run_host_stage(transport: Transport, *, python: str, payload_dir: str, dest: str, scene: str,
                   mirrors: list[str], sha256: dict[str, str], tuning: StageTuning,
                   progress: StageProgress | None, from_local: str | None = None,
                   stop: Any = None, fetch_only: bool = False) -> HostStageResult:
    """Start `remote_payload stage` detached on the host and follow it to its end (bounded)."""

    tag = uuid.uuid4().hex[:8]
    status = f"{dest}/.stage-{scene}-{tag}.json"
    rc_path = status + ".rc"
    cmd = (payload_cmd(python, payload_dir, _stage_args(dest, scene, mirrors, sha256, tuning, status, from_local,
                                                          fetch_only))
           + f"; echo $? > {shlex.quote(rc_path)}.tmp && mv {shlex.quote(rc_path)}.tmp {shlex.quote(rc_path)}")
    pid = _start_detached(transport, cmd, f"{dest}/.stage-{scene}-{tag}.log")
    deadline = time.monotonic() + tuning.timeout_s + 120
    last: dict[str, Any] = {}
    # One round trip per poll: the latest event, whether the process lives, then its exit code
    # (read after the liveness check: the code is written before the process exits, so
    # "dead and no code" really means it was killed).
    poll = (f"cat {shlex.quote(status)} 2>/dev/null; echo; echo {_SEP}; "
            f"kill -0 {int(pid)} 2>/dev/null && echo alive; echo {_SEP}; "
            f"cat {shlex.quote(rc_path)} 2>/dev/null; true")
    while True:
        out = transport.run(poll, check=False, timeout_s=60).stdout
        event_text, _, rest = out.partition(_SEP)
        alive_text, _, rc_text = rest.partition(_SEP)
        last = _parse_event(event_text) or last
        if not rc_text.strip() and "alive" not in alive_text:
            rc_text = "1"
            last = {"event": "error", "exit_code": 1, "message": "the staging process on the host "
                    "ended without an exit code (killed?); see " + f"{dest}/.stage-{scene}-{tag}.log"}
        if progress and last.get("event") == "progress":
            what = {"download": "downloading", "extract": "extracting", "validate": "validating"}.get(
                str(last.get("phase")), str(last.get("phase")))
            rate = float(last.get("rate_bytes_per_s") or 0.0)
            eta = last.get("eta_s")
            msg = f"{scene}: {what}" + (f" {rate / 1e6:.1f} MB/s" if rate else "") + (
                f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else "")
            progress(redact(msg), int(last.get("bytes") or 0), last.get("total"))
        elif progress and last.get("event") == "done" and not last.get("cached"):
            rate = float(last.get("rate_bytes_per_s") or 0.0)
            n = int(last.get("bytes") or 0)
            progress(f"{scene}: staged" + (f" at {rate / 1e6:.1f} MB/s" if rate else ""), n, n)
        if rc_text.strip():
            break
        interrupted = stop is not None and stop.is_set()    # Ctrl-C: no waiting out a download
        if interrupted or time.monotonic() > deadline:
            transport.run(f"kill -TERM -- -{int(pid)} 2>/dev/null || kill -TERM {int(pid)} 2>/dev/null || true",
                          check=False, timeout_s=30)
            if interrupted:
                raise StagingError(f"staging {scene!r} on the host was interrupted")
            raise StagingError(f"staging {scene!r} on the host did not finish within {tuning.timeout_s:g} s",
                               hint="check the mirrors, or raise the staging timeout")
        time.sleep(POLL_S)
    try:
        code = int(rc_text.strip())
    except ValueError:
        code = 1
    if code != 0 and last.get("event") != "error":
        tail = transport.read_text(f"{dest}/.stage-{scene}-{tag}.log") or ""
        last = {"event": "error", "exit_code": code,
                "message": (tail.strip().splitlines() or ["(no output)"])[-1]}
    transport.run(f"rm -f {shlex.quote(status)} {shlex.quote(rc_path)}", check=False, timeout_s=30)  # keep the .log
    return HostStageResult(code, last, redact(str(last.get("message", ""))))


def _start_detached(transport: Transport, command: str, log_path: str) -> int:
    """Start `command` in its own session with every stream redirected and return its pid at once.

    Built on `transport.run` so that it returns at once on every transport: the mkdir and the
    background job are separate statements (`mkdir ... && nohup ... &` would background the whole
    list in a subshell that keeps the pipe open until the command ends: no live progress)."""
    q = shlex.quote
    script = (f"mkdir -p {q(log_path.rsplit('/', 1)[0])}; "
              f"nohup setsid bash -c {q(command)} >>{q(log_path)} 2>&1 </dev/null & echo $!")
    res = transport.run(script, timeout_s=60)
    try:
        return int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise StagingError(f"could not start staging on the host: {redact(res.stdout[-200:])!r}") from None


def _parse_event(text: str) -> dict[str, Any] | None:
    text = text.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None   # caught mid-rewrite on a transport without atomic rename: next poll
    return obj if isinstance(obj, dict) else None


def find_local_scene(root: Path, scene: str) -> Path | None:
    """In a controller-side copy: `root/<scene>/`, `root/*/<scene>/`, or root itself when it is the scene."""
    for cand in (root / scene, *sorted(root.glob(f"*/{scene}"))):
        if (cand / "transforms_train.json").is_file() or (cand / "transforms_test.json").is_file():
            return cand
    if (root / "transforms_train.json").is_file() and root.name == scene:
        return root
    return None


def upload_local(transport: Transport, dataset: DatasetConfig, scene: str, dest: str, *, python: str,
                 payload_dir: str, tuning: StageTuning, progress: StageProgress | None) -> tuple[str, list[str]]:
    """Upload the first usable file:// copy and stage it on the host; return (scene_dir, notes)."""
    notes: list[str] = []
    for url in dataset.mirrors or ():
        if not is_local_mirror(url):
            continue
        path = local_path(url.replace("{scene}", scene))
        if not path.exists():
            notes.append(f"{url}: {path} does not exist on this machine")
            continue
        if path.is_dir():
            src = find_local_scene(path, scene)
            if src is None:
                notes.append(f"{url}: no scene {scene!r} under {path}")
                continue
        else:
            src = path
        remote = f"{dest}/.upload/{uuid.uuid4().hex[:8]}/{scene if src.is_dir() else src.name}"

        def on_bytes(done: int, total: int | None, _src: Path = src) -> None:
            if progress:
                progress(f"{scene}: uploading {_src.name}", done, total)

        stats = transport.put(src, remote, progress=on_bytes)
        log.info("uploaded %s to the host: %d bytes in %.1f s", src, stats.bytes, stats.seconds)
        res = run_host_stage(transport, python=python, payload_dir=payload_dir, dest=dest, scene=scene,
                             mirrors=[], sha256=dict(dataset.sha256 or {}),
                             tuning=tuning, progress=progress, from_local=remote)
        if res.exit_code == 0:
            return str(res.last_event.get("scene_dir") or f"{dest}/{scene}"), notes
        if res.exit_code == EXIT_BAD_DATA:
            raise DatasetInvalid(f"dataset {dataset.name!r}, scene {scene!r} (uploaded from {path}): {res.message}",
                                 hint="fix or replace the dataset; nothing was trained")
        notes.append(f"{url}: {res.message}")
    raise StagingError(f"dataset {dataset.name!r}: no copy of scene {scene!r} could be staged "
                       f"({'; '.join(notes) or 'no mirrors declared'})",
                       hint="add a mirror the host can reach, or a file:// path to a local copy")


def _host_cache(transport: Transport, dataset: DatasetConfig, scene: str,
                content_key: Callable[[Any], str]) -> tuple[str, bool]:
    """The dataset's cache directory on the host, and whether `scene` is staged there (validated)."""
    dest = f"{transport.root}/cache/datasets/{dataset_key(dataset, content_key)}"
    return dest, transport.read_text(f"{dest}/.complete-{scene}") is not None


def _network_mirrors(dataset: DatasetConfig) -> list[str]:
    """The mirrors the host downloads from itself (file:// copies are the controller's to upload)."""
    return [m for m in dataset.mirrors or () if not is_local_mirror(m)]


def stage_mirrored(transport: Transport, dataset: DatasetConfig, scene: str, *, python: str,
                   payload_dir: str, progress: StageProgress | None, content_key: Callable[[Any], str],
                   tuning: StageTuning | None = None, stop: Any = None) -> str:
    tuning = tuning or StageTuning()
    dest, staged = _host_cache(transport, dataset, scene, content_key)
    scene_dir = f"{dest}/{scene}"
    if staged:
        log.info("dataset %s scene %s: cached on the host at %s", dataset.name, scene, scene_dir)
        return scene_dir
    network = _network_mirrors(dataset)
    has_local = any(is_local_mirror(m) for m in dataset.mirrors or ())
    if not network and not has_local:
        raise StagingError(f"dataset {dataset.name!r} declares neither mirrors nor generate:",
                           hint="add mirrors: [https://..., file://...] or a generate: block")
    if network:
        res = run_host_stage(transport, python=python, payload_dir=payload_dir, dest=dest, scene=scene,
                             mirrors=network, sha256=dict(dataset.sha256 or {}),
                             tuning=tuning, progress=progress, stop=stop)
        if res.exit_code == 0:
            return str(res.last_event.get("scene_dir") or scene_dir)
        if res.exit_code == EXIT_BAD_DATA:
            raise DatasetInvalid(f"dataset {dataset.name!r}, scene {scene!r}: {res.message}",
                                 hint="fix or replace the dataset; nothing was trained")
        if not has_local:
            raise StagingError(f"dataset {dataset.name!r}, scene {scene!r}: {res.message}",
                               hint="check the mirror URLs from the host, or add a file:// local copy to upload")
        log.warning("dataset %s: %s; uploading the local copy instead", dataset.name, res.message)
    path, _ = upload_local(transport, dataset, scene, dest, python=python, payload_dir=payload_dir,
                              tuning=tuning, progress=progress)
    return path


def prefetch_mirrored(transport: Transport, dataset: DatasetConfig, scene: str, *, python: str,
                      payload_dir: str, content_key: Callable[[Any], str], stop: Any = None,
                      tuning: StageTuning | None = None) -> bool:
    """Download a mirrored scene with the host's own python while the job's environment is built
    (`stage --fetch-only`: standard library only). Best effort: True when the files are on the
    host; on any failure False, and the full staging that follows tries again and reports."""
    network = _network_mirrors(dataset)
    if not network or dataset.generate is not None:
        return False
    dest, staged = _host_cache(transport, dataset, scene, content_key)
    if staged:
        return False
    try:
        res = run_host_stage(transport, python=python, payload_dir=payload_dir, dest=dest, scene=scene,
                             mirrors=network, sha256=dict(dataset.sha256 or {}), tuning=tuning or StageTuning(),
                             progress=None, stop=stop, fetch_only=True)
    except StagingError as exc:
        log.debug("dataset %s scene %s: prefetch stopped: %s", dataset.name, scene, exc)
        return False
    if res.exit_code != 0:
        log.debug("dataset %s scene %s: prefetch failed (%s); staging will try again",
                  dataset.name, scene, res.message)
    return res.exit_code == 0
