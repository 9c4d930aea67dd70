"""Checks a mirrored dataset declaration can pass before anything is rented (money rule: validate
configs and datasets first). Cheap and offline: schemes, checksum format, local copies."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import StagingError
from .mirrored import find_local_scene, is_local_mirror, local_path

if TYPE_CHECKING:
    from ..config import DatasetConfig

SCHEMES = ("https", "http", "s3", "hf", "file")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def mirror_problem(url: str) -> str | None:
    """Why `url` cannot be a mirror, or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        return f"mirror {url!r} is not a URL (use https://..., s3://bucket/key, hf://datasets/owner/name/file or file://path)"
    if scheme.lower() not in SCHEMES:
        return f"mirror {url!r}: unsupported scheme {scheme!r} (use one of {', '.join(SCHEMES)})"
    if scheme.lower() == "s3" and "/" not in rest.strip("/"):
        return f"mirror {url!r}: needs s3://bucket/key"
    if scheme.lower() == "hf" and len(rest.strip("/").split("/")) < 3:
        return f"mirror {url!r}: needs hf://datasets/owner/name/path"
    return None


def preflight(dataset: DatasetConfig, scenes: list[str] | tuple[str, ...] = ()) -> None:
    """Raise StagingError (one line + hint) when `dataset` cannot possibly be staged."""
    if dataset.generate is not None:
        return
    mirrors = list(dataset.mirrors or ())
    if not mirrors:
        raise StagingError(f"dataset {dataset.name!r} declares neither mirrors nor generate:",
                           hint="add mirrors: [https://..., file://...] or a generate: block")
    for url in mirrors:
        problem = mirror_problem(url)
        if problem:
            raise StagingError(f"dataset {dataset.name!r}: {problem}")
    for key, value in dict(dataset.sha256 or {}).items():
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise StagingError(f"dataset {dataset.name!r}: sha256[{key!r}] must be 64 hex digits",
                               hint="paste the output of `sha256sum FILE`")
    if all(is_local_mirror(u) for u in mirrors):
        for scene in scenes or ("",):
            usable = []
            for url in mirrors:
                path = local_path(url.replace("{scene}", scene))
                if path.is_file() or (path.is_dir() and (not scene or find_local_scene(path, scene))):
                    usable.append(path)
            if not usable:
                where = ", ".join(str(local_path(u.replace("{scene}", scene))) for u in mirrors)
                raise StagingError(f"dataset {dataset.name!r}: no local copy{f' of scene {scene!r}' if scene else ''} "
                                   f"at {where}", hint="fix the file:// path, or add a mirror the host can reach")
