"""Procedural NeRF-synthetic scenes: the data every test and the default demo use.

`generate_scene` ray-traces analytic primitives (checker-textured spheres and boxes, thin striped
rods) and writes exactly what a Blender NeRF-synthetic scene holds: `transforms_{train,val,test}.json`
(`camera_angle_x`, frames with `file_path` without extension and a camera-to-world
`transform_matrix`) and RGBA PNGs with straight alpha. Train and val cameras lie on the upper
hemisphere at random; test cameras circle the object at 30° elevation, like the Blender test sets.
Pixels are supersampled, so silhouettes carry fractional alpha. Deterministic by seed.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .cameras import BLENDER_CAMERA_ANGLE_X, camera_rays_np, focal_from_angle, look_at_origin, sphere_position
from .contract import SCENES
from .errors import NgpError
from .shapes import Box, Cylinder, Primitive, Sphere, trace

log = logging.getLogger(__name__)

CAMERA_RADIUS = 4.0
DEFAULT_COUNTS = {"train": 100, "val": 8, "test": 20}


def _palette(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """`n` saturated, distinct colours (HSV with spread hues)."""
    hues = (rng.uniform() + np.arange(n) / n) % 1.0
    out = []
    for h in rng.permutation(hues):
        s, v = rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0)
        k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
        rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        out.append(tuple(float(c) for c in rgb))
    return out


def _default(rng: np.random.Generator) -> tuple[Primitive, ...]:
    """A small table: checkered top, striped thin legs, a checker ball, a checker cube, beads, a rail."""
    c = _palette(rng, 10)
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731 - small jitter helper
    top_z = 0.0 + j(0.05)
    prims: list[Primitive] = [
        Box((-0.72, -0.72, top_z - 0.1), (0.72, 0.72, top_z), (0.93, 0.88, 0.78), c[0], cell=0.16),
        Sphere((0.2 + j(0.05), -0.15 + j(0.05), top_z + 0.36), 0.36, c[1], c[2], checks=12),
        Box((-0.62, 0.12, top_z), (-0.22, 0.52, top_z + 0.4), c[3], (0.95, 0.95, 0.95), cell=0.1),
        Cylinder(2, (-0.45 + j(0.03), -0.45 + j(0.03)), 0.03, top_z, top_z + 0.75, c[4], (0.1, 0.1, 0.1), ring=0.08),
        Cylinder(0, (0.55, top_z + 0.5), 0.02, -0.6, 0.6, c[5], (0.95, 0.95, 0.95), ring=0.1),
    ]
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append(Cylinder(2, (0.6 * sx, 0.6 * sy), 0.045, -0.95, top_z - 0.1, c[6], (0.15, 0.15, 0.15),
                                  ring=0.12))
        prims.append(Cylinder(1, (0.55 * sx, top_z + 0.02), 0.02, -0.6, 0.6, c[5], (0.95, 0.95, 0.95), ring=0.1))
    for k in range(5):
        a = 2 * math.pi * k / 5 + j(0.2)
        prims.append(Sphere((0.62 * math.cos(a) * 0.9, 0.62 * math.sin(a) * 0.9, top_z + 0.08), 0.08,
                            c[7 + k % 3], c[7 + k % 3]))
    return tuple(prims)


def _spheres(rng: np.random.Generator) -> tuple[Primitive, ...]:
    """Several checker spheres of different sizes and colours."""
    c = _palette(rng, 12)
    prims: list[Primitive] = []
    for k in range(6):
        a, z = 2 * math.pi * k / 6 + rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.5)
        r = float(rng.uniform(0.22, 0.38))
        prims.append(Sphere((0.65 * math.cos(a), 0.65 * math.sin(a), z), r, c[2 * k], c[2 * k + 1],
                            checks=int(rng.integers(6, 16))))
    prims.append(Sphere((0.0, 0.0, 0.0), 0.3, (0.95, 0.95, 0.95), c[0], checks=20))
    return tuple(prims)


def _rods(rng: np.random.Generator) -> tuple[Primitive, ...]:
    """A cage of thin striped rods around a checker ball."""
    c = _palette(rng, 8)
    prims: list[Primitive] = [Sphere((0.0, 0.0, 0.0), 0.45, c[0], c[1], checks=10)]
    for k in range(8):
        a = 2 * math.pi * k / 8
        prims.append(Cylinder(2, (0.8 * math.cos(a), 0.8 * math.sin(a)), 0.025, -0.9, 0.9, c[2 + k % 4],
                              (0.95, 0.95, 0.95), ring=0.1))
    for z in (-0.9, 0.9):
        prims.append(Box((-0.85, -0.85, z - 0.05), (0.85, 0.85, z + 0.05) if z > 0 else (0.85, 0.85, z + 0.05),
                         c[6], c[7], cell=0.15))
    return tuple(prims)


def _blocks(rng: np.random.Generator) -> tuple[Primitive, ...]:
    """A stack of checkered blocks, like toy bricks."""
    c = _palette(rng, 12)
    prims: list[Primitive] = []
    z = -0.9
    for k in range(5):
        h = float(rng.uniform(0.2, 0.4))
        half = 0.75 - 0.1 * k
        off = rng.uniform(-0.1, 0.1, size=2)
        prims.append(Box((off[0] - half, off[1] - half, z), (off[0] + half, off[1] + half, z + h),
                         c[2 * k], c[2 * k + 1], cell=float(rng.choice([0.08, 0.12, 0.16]))))
        z += h
    return tuple(prims)


_BUILDERS: dict[str, Callable[[np.random.Generator], tuple[Primitive, ...]]] = {
    "default": _default, "spheres": _spheres, "rods": _rods, "blocks": _blocks,
}


def scene_primitives(scene: str, seed: int) -> tuple[Primitive, ...]:
    if scene not in _BUILDERS:
        raise NgpError(f"unknown scene {scene!r}; choose one of: {', '.join(SCENES)}")
    return _BUILDERS[scene](np.random.default_rng(seed))


def render_view(prims: tuple[Primitive, ...], c2w: np.ndarray, size: int, focal: float,
                supersample: int) -> np.ndarray:
    """RGBA uint8 (size, size, 4), straight alpha, of the primitives from camera `c2w`."""
    o, d = camera_rays_np(c2w, size, size, focal, supersample)
    shape = o.shape[:3]
    rgb, cover = trace(prims, o.reshape(-1, 3), d.reshape(-1, 3))
    rgb, cover = rgb.reshape(*shape, 3), cover.reshape(shape)
    alpha = cover.mean(axis=2)
    colour = (rgb * cover[..., None]).sum(axis=2) / np.maximum(cover.sum(axis=2), 1e-12)[..., None]
    rgba = np.concatenate([colour, alpha[..., None]], axis=-1)
    return np.clip(np.round(rgba * 255.0), 0, 255).astype(np.uint8)


def _poses(split: str, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    if split == "test":
        return [look_at_origin(sphere_position(CAMERA_RADIUS, 2 * math.pi * k / n, math.radians(30.0)))
                for k in range(n)]
    out = []
    for _ in range(n):
        az = rng.uniform(0, 2 * math.pi)
        el = math.asin(rng.uniform(math.sin(math.radians(5.0)), math.sin(math.radians(85.0))))
        out.append(look_at_origin(sphere_position(CAMERA_RADIUS, az, el)))
    return out


def _write_view(job: tuple) -> None:
    from PIL import Image

    prims, c2w, size, focal, ss, path = job
    Image.fromarray(render_view(prims, c2w, size, focal, ss), "RGBA").save(path)


def generate_scene(out_dir: str | Path, scene: str = "default", size: int = 64, seed: int = 0, *,
                   n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
                   supersample: int | None = None, workers: int = 1) -> Path:
    """Write a NeRF-synthetic scene to `out_dir` and return its path.

    `size` is the image width and height in pixels; counts default to 100/8/20 views.
    `workers` > 1 renders views in that many processes (the same images: each view depends only
    on its pose, and the poses are drawn first).
    """
    if not isinstance(size, int) or size < 8 or size > 2048:
        raise NgpError(f"scene size must be an integer between 8 and 2048 pixels, got {size!r}")
    prims = scene_primitives(scene, seed)
    counts = {"train": n_train if n_train is not None else DEFAULT_COUNTS["train"],
              "val": n_val if n_val is not None else DEFAULT_COUNTS["val"],
              "test": n_test if n_test is not None else DEFAULT_COUNTS["test"]}
    if any(v < 1 for v in counts.values()):
        raise NgpError(f"every split needs at least one view, got {counts}")
    ss = supersample if supersample is not None else (3 if size <= 256 else 2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    focal = focal_from_angle(size, BLENDER_CAMERA_ANGLE_X)
    rng = np.random.default_rng(seed + 7919)
    jobs = []
    for split in ("train", "val", "test"):
        (out / split).mkdir(exist_ok=True)
        frames = []
        for k, c2w in enumerate(_poses(split, counts[split], rng)):
            jobs.append((prims, c2w, size, focal, ss, out / split / f"r_{k}.png"))
            frames.append({"file_path": f"./{split}/r_{k}", "rotation": 0.0,
                           "transform_matrix": [[float(v) for v in row] for row in c2w]})
        meta = {"camera_angle_x": BLENDER_CAMERA_ANGLE_X, "frames": frames}
        (out / f"transforms_{split}.json").write_text(json.dumps(meta, indent=2))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_view, jobs, chunksize=1))
    else:
        for job in jobs:
            _write_view(job)
    log.info("generated scene %r (%d px, seed %d) in %s", scene, size, seed, out)
    return out
