"""`python -m remote_payload stage`: fetch one scene of a dataset into the host's cache.

Prints one JSON object per line on stdout, for the controller's progress bar:
    {"event": "probe", "mirror", "ok", "rate_bytes_per_s", "total_bytes", "error"}
    {"event": "progress", "phase": "download"|"extract"|"validate", "bytes", "total",
     "rate_bytes_per_s", "eta_s", "mirror"}
    {"event": "failover", "mirror", "outcome", "at_byte"}
    {"event": "done", "scene_dir", "cached", "bytes", "seconds", "rate_bytes_per_s", "mirror"}
    {"event": "error", "exit_code", "message"}
Exit codes: 0 ok, 1 other error, 2 bad data (fake, broken, unsafe), 3 no working mirror.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cache
from .errors import BadData, NoMirror, StageError
from .extract import extract, safe_relpath
from .fetch import Download, FetchPolicy, download, probe, rank
from .sources import Source, resolve

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], None]


def _emit_stdout(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _progress(emit: Emit, phase: str) -> Callable[[int, int | None, float, str], None]:
    def report(done: int, total: int | None, rate: float, mirror: str) -> None:
        eta = (total - done) / rate if total is not None and rate > 0 else None
        emit({"event": "progress", "phase": phase, "bytes": done, "total": total,
              "rate_bytes_per_s": round(rate, 1), "eta_s": None if eta is None else round(eta, 1),
              "mirror": mirror})
    return report


def validate(scene_dir: Path, scene: str) -> None:
    """The same check as `remote_payload check-data`; BadData with its one-line reason."""
    try:
        from ngp_train.data import validate_dataset
        from ngp_train.errors import DatasetError
    except ImportError as exc:
        raise StageError(f"cannot validate {scene_dir}: ngp_train is not importable ({exc})") from None
    try:
        validate_dataset(scene_dir)
    except DatasetError as exc:
        raise BadData(str(exc).splitlines()[0] if str(exc) else f"scene {scene!r} is not usable") from None


def _report_attempts(emit: Emit, dl: Download) -> None:
    for a in dl.attempts:
        if a.outcome != "complete":
            emit({"event": "failover", "mirror": a.url, "outcome": a.outcome, "at_byte": a.end_byte})


def _fetch_archive(sources: list[Source], total: int | None, dest: Path, checksums: dict[str, str],
                   policy: FetchPolicy, deadline: float, emit: Emit) -> tuple[Download, Path]:
    name = sources[0].archive_name
    target = dest / ".download" / name
    dl = download(sources, target, total_bytes=total, policy=policy, deadline=deadline,
                  on_progress=_progress(emit, "download"))
    _report_attempts(emit, dl)
    want = checksums.get(name)
    if want:
        got = cache.sha256_file(target)
        if got.lower() != want.lower():
            target.unlink()
            raise BadData(f"{name}: sha256 {got[:16]}… does not match the declared {want[:16]}… "
                          "(the mirror serves another file, or the checksum is wrong)")
    return dl, target


def _fetch_tree(sources: list[Source], scene: str, tree: Path, policy: FetchPolicy, deadline: float,
                emit: Emit) -> Download | None:
    """Fetch `<mirror><scene>/transforms_*.json` and every frame they list into `tree/<scene>/`."""
    out = tree / scene
    done_bytes, t0, last = 0, time.monotonic(), None

    def fetch(rel: str) -> Download:
        nonlocal done_bytes, last
        target = out / rel
        if target.is_file():
            return Download(target, target.stat().st_size, 0, 0.0, ())
        files = [s.file_source(f"{scene}/{rel}") for s in sources]
        last = download(files, target, total_bytes=None, policy=policy, deadline=deadline)
        _report_attempts(emit, last)
        done_bytes += last.fetched_bytes
        _progress(emit, "download")(done_bytes, None, done_bytes / max(time.monotonic() - t0, 1e-6),
                                    files[0].display)
        return last

    got_any = False
    for split in ("train", "val", "test"):
        try:
            meta_path = fetch(f"transforms_{split}.json").path
        except NoMirror:
            continue
        got_any = True
        try:
            frames = json.loads(meta_path.read_text()).get("frames", [])
        except (ValueError, AttributeError):
            raise BadData(f"{scene}/transforms_{split}.json is not valid JSON") from None
        for frame in frames:
            rel = safe_relpath(str(frame.get("file_path", "")), f"{scene}/transforms_{split}.json")
            fetch(rel if Path(rel).suffix else rel + ".png")
    if not got_any:
        raise NoMirror(f"no tree mirror has {scene}/transforms_{{train,val,test}}.json")
    return last


def stage(dest: Path, scene: str, mirrors: list[str], checksums: dict[str, str], *, policy: FetchPolicy,
          timeout_s: float, emit: Emit, from_local: Path | None = None, refresh: bool = False,
          fetch_only: bool = False) -> Path:
    """Make `<dest>/<scene>` a validated scene; return it. Raises StageError subclasses.

    `fetch_only`: download, extract and verify checksums, but neither validate nor mark the
    scene complete. Validation decodes images (numpy, PIL); this part needs only the standard
    library, so a host's own python can fetch while the job's environment is still being built."""
    deadline = time.monotonic() + timeout_s
    scene = safe_relpath(scene, "scene name")
    scene_dir, marker = dest / scene, dest / f".complete-{scene}"
    if not refresh and marker.is_file() and scene_dir.is_dir():
        emit({"event": "done", "scene_dir": str(scene_dir), "cached": True, "bytes": 0, "seconds": 0.0,
              "rate_bytes_per_s": 0.0, "mirror": None})
        return scene_dir
    with cache.locked(dest, timeout_s):
        if refresh:
            for child in dest.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif marker.is_file() and scene_dir.is_dir():      # staged by a job that held the lock
            emit({"event": "done", "scene_dir": str(scene_dir), "cached": True, "bytes": 0,
                  "seconds": 0.0, "rate_bytes_per_s": 0.0, "mirror": None})
            return scene_dir
        tree = dest / ".tree"
        t0, dl, used = time.monotonic(), None, None
        if not scene_dir.is_dir() and cache.find_scene(tree, scene) is None:
            if from_local is not None:
                _take_local(from_local, tree, emit)
            else:
                dl, used = _fetch(dest, scene, mirrors, checksums, policy, deadline, emit)
        if not scene_dir.is_dir():
            found = cache.find_scene(tree, scene)
            if found is None:
                held = ", ".join(cache.scenes_in(tree)) or "no NeRF-synthetic scene"
                raise BadData(f"scene {scene!r} is not in the dataset (it holds: {held})")
            cache.place(found, scene_dir)
        emit({"event": "progress", "phase": "validate", "bytes": 0, "total": None,
              "rate_bytes_per_s": 0.0, "eta_s": None, "mirror": None})
        cache.verify_files(dest, scene, checksums)
        if not fetch_only:
            validate(scene_dir, scene)
            marker.write_text(json.dumps({"scene": scene, "mirror": used, "at": time.time()}))
    seconds = time.monotonic() - t0
    emit({"event": "done", "scene_dir": str(scene_dir), "cached": False, "validated": not fetch_only,
          "bytes": dl.fetched_bytes if dl else 0, "seconds": round(seconds, 3),
          "rate_bytes_per_s": round(dl.rate_bytes_per_s, 1) if dl else 0.0, "mirror": used})
    return scene_dir


def _take_local(src: Path, tree: Path, emit: Emit) -> None:
    """Use a copy the controller uploaded: an archive is extracted, a directory moved in."""
    if src.is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        os.replace(src, tree / src.name)
        with contextlib.suppress(OSError):
            src.parent.rmdir()   # the controller's per-upload directory, now empty
        return
    emit({"event": "progress", "phase": "extract", "bytes": src.stat().st_size, "total": None,
          "rate_bytes_per_s": 0.0, "eta_s": None, "mirror": "upload"})
    tmp = tree.with_name(".tree.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extract(src, tmp, src.name)
    _merge(tmp, tree)
    src.unlink()
    with contextlib.suppress(OSError):
        src.parent.rmdir()


def _merge(tmp: Path, tree: Path) -> None:
    if not tree.exists():
        os.replace(tmp, tree)
        return
    for child in tmp.iterdir():
        if not (tree / child.name).exists():
            os.replace(child, tree / child.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _fetch(dest: Path, scene: str, mirrors: list[str], checksums: dict[str, str], policy: FetchPolicy,
           deadline: float, emit: Emit) -> tuple[Download | None, str | None]:
    sources = [s for s in (resolve(m, scene) for m in mirrors) if s is not None]
    if not sources:
        raise NoMirror("no mirror the host can reach (only file:// mirrors, which the controller uploads)")
    archives_done = [s for s in sources if s.kind == "archive"
                     and (dest / f".extracted-{s.archive_name}").is_file()]
    if archives_done:       # extracted before, and the scene is not in it: downloading again won't help
        return None, archives_done[0].display
    probes = []
    for src in sources:
        p = probe(src if src.kind == "archive" else src.file_source(f"{scene}/transforms_train.json"), policy)
        probes.append(p)
        emit({"event": "probe", "mirror": src.display, "ok": p.ok, "rate_bytes_per_s": round(p.rate_bytes_per_s, 1),
              "total_bytes": p.total_bytes, "error": p.error})
    ranked_archives, total = rank([p for p in probes if p.source.kind == "archive"])
    ranked_trees, _ = rank([p for p in probes if p.source.kind == "file"])
    tree_sources = [s for s in sources if s.kind == "tree"]
    trees = [next(t for t in tree_sources if p.source.url.startswith(t.url)) for p in ranked_trees]
    archives = [p.source for p in ranked_archives]
    if not archives and not trees:
        reasons = "; ".join(f"{p.source.display}: {p.error}" for p in probes)
        raise NoMirror(f"no mirror answered ({reasons})")
    best_rate = {"archive": ranked_archives[0].rate_bytes_per_s if ranked_archives else -1.0,
                 "tree": ranked_trees[0].rate_bytes_per_s if ranked_trees else -1.0}
    order = sorted(("archive", "tree"), key=lambda k: -best_rate[k])
    last_error: StageError | None = None
    for kind in order:
        try:
            if kind == "archive" and archives:
                dl, path = _fetch_archive(archives, total, dest, checksums, policy, deadline, emit)
                tmp = dest / ".tree.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                emit({"event": "progress", "phase": "extract", "bytes": dl.total_bytes, "total": dl.total_bytes,
                      "rate_bytes_per_s": 0.0, "eta_s": None, "mirror": archives[0].display})
                extract(path, tmp, path.name)
                _merge(tmp, dest / ".tree")
                (dest / f".extracted-{path.name}").write_text(json.dumps({"bytes": dl.total_bytes}))
                path.unlink()
                done_by = next((a.url for a in reversed(dl.attempts) if a.outcome == "complete"), None)
                return dl, done_by
            if kind == "tree" and trees:
                tree_dl = _fetch_tree(trees, scene, dest / ".tree", policy, deadline, emit)
                return tree_dl, trees[0].display
        except NoMirror as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def _parse_checksums(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key or len(value) != 64:
            raise StageError(f"--sha256 {item!r}: expected NAME=<64 hex digits>")
        out[key] = value
    return out


_DEFAULT = FetchPolicy()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="remote_payload stage", description=__doc__.splitlines()[0])
    p.add_argument("--dest", required=True, help="cache directory of this dataset (<root>/cache/datasets/<sha>)")
    p.add_argument("--scene", required=True)
    p.add_argument("--mirror", action="append", default=[], help="mirror URL, in order of preference")
    p.add_argument("--sha256", action="append", default=[], help="NAME=HEX for an archive or <scene>/<file>")
    p.add_argument("--from-local", type=Path, help="an archive or directory the controller uploaded")
    p.add_argument("--refresh", action="store_true", help="drop what is cached and stage again")
    p.add_argument("--fetch-only", action="store_true",
                   help="download and verify checksums only (standard library); a later stage validates")
    p.add_argument("--timeout-s", type=float, default=6 * 3600.0)
    p.add_argument("--probe-bytes", type=int, default=_DEFAULT.probe_bytes)
    p.add_argument("--probe-timeout-s", type=float, default=_DEFAULT.probe_timeout_s)
    p.add_argument("--stall-floor-bytes-per-s", type=float, default=_DEFAULT.stall_floor_bytes_per_s)
    p.add_argument("--stall-period-s", type=float, default=_DEFAULT.stall_period_s)
    p.add_argument("--status-file", type=Path,
                   help="also keep the latest event here (atomic rewrite), for a controller to poll")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _with_status_file(emit: Emit, path: Path) -> Emit:
    path.parent.mkdir(parents=True, exist_ok=True)

    def both(obj: dict[str, Any]) -> None:
        emit(obj)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    return both


def run(args: argparse.Namespace, emit: Emit = _emit_stdout) -> int:
    if getattr(args, "status_file", None):
        emit = _with_status_file(emit, args.status_file)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        policy = FetchPolicy(probe_bytes=args.probe_bytes, probe_timeout_s=args.probe_timeout_s,
                             stall_floor_bytes_per_s=args.stall_floor_bytes_per_s,
                             stall_period_s=args.stall_period_s)
        stage(Path(args.dest), args.scene, args.mirror, _parse_checksums(args.sha256), policy=policy,
              timeout_s=args.timeout_s, emit=emit, from_local=args.from_local, refresh=args.refresh,
              fetch_only=args.fetch_only)
    except StageError as exc:
        emit({"event": "error", "exit_code": exc.exit_code, "message": str(exc)})
        sys.stderr.write(f"{exc}\n")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the controller needs one line, not a traceback
        log.debug("staging failed", exc_info=True)
        emit({"event": "error", "exit_code": 1, "message": f"staging failed: {type(exc).__name__}: {exc}"})
        sys.stderr.write(f"staging failed: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
