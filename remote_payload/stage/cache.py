"""The dataset cache directory on the host: lock, scene lookup, placement, checksums.

    <dest>/                 = <root>/cache/datasets/<sha>/  (chosen by the controller)
      .lock                 flock held while one process stages into it
      .download/            archives being fetched (<name>.part while incomplete)
      .tree/                extracted archives / fetched trees (every scene they hold)
      .extracted-<archive>  the archive was fully extracted into .tree/
      <scene>/              a placed scene
      .complete-<scene>     the scene was validated: a later staging does nothing
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import BadData, StageError

SKIP_DIRS = {"__MACOSX", ".download"}


@contextlib.contextmanager
def locked(dest: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on `dest` (another job on this host may be staging the same data)."""
    dest.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(dest / ".lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StageError(f"{dest} is locked by another staging for more than {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_scene(d: Path) -> bool:
    return any((d / f"transforms_{s}.json").is_file() for s in ("train", "val", "test"))


def find_scene(tree: Path, scene: str, max_depth: int = 4) -> Path | None:
    """The shallowest directory named `scene` under `tree`; else the single scene-looking dir."""
    if not tree.is_dir():
        return None
    level = [tree]
    scene_like: list[Path] = []
    for _ in range(max_depth):
        nxt: list[Path] = []
        for d in level:
            for child in sorted(d.iterdir()):
                if not child.is_dir() or child.is_symlink() or child.name in SKIP_DIRS:
                    continue
                if child.name == scene:
                    return child
                if _is_scene(child):
                    scene_like.append(child)
                nxt.append(child)
        level = nxt
    if _is_scene(tree):
        scene_like.insert(0, tree)
    return scene_like[0] if len(scene_like) == 1 else None


def scenes_in(tree: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, _ in os.walk(tree):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        if _is_scene(Path(dirpath)):
            found.append(Path(dirpath).name)
    return sorted(found)


def place(found: Path, scene_dir: Path) -> None:
    """Move the scene out of the extracted tree to `<dest>/<scene>` (same filesystem: a rename).

    A single-scene archive extracted at the tree root moves the whole tree."""
    if found.resolve() != scene_dir.resolve():
        os.replace(found, scene_dir)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(dest: Path, scene: str, checksums: dict[str, str]) -> int:
    """Check the per-file checksums whose key lies under `<scene>/`; return how many were checked."""
    n = 0
    for key, want in checksums.items():
        rel = key.strip("/")
        if not rel.startswith(scene + "/"):
            continue
        path = dest / rel
        if not path.is_file():
            raise BadData(f"{rel}: listed in sha256 but missing from the dataset")
        got = sha256_file(path)
        if got.lower() != want.lower():
            raise BadData(f"{rel}: sha256 {got[:16]}… does not match the declared {want[:16]}…")
        n += 1
    return n
