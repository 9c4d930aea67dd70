"""Analytic primitives for the procedural scenes: ray intersection and Lambertian shading.

Every primitive answers `hit(o, d) -> t` (inf where missed; o, d: (N, 3)) and
`surface(p) -> (normal, albedo)` for hit points p (M, 3). Textures are defined on the surface or
in space, so every view sees the same colours (a static, view-independent scene).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-6
_LIGHTS = (
    (np.array([0.45, 0.30, 0.84]) / np.linalg.norm([0.45, 0.30, 0.84]), 0.65),
    (np.array([-0.55, -0.45, -0.30]) / np.linalg.norm([-0.55, -0.45, -0.30]), 0.25),
)
_AMBIENT = 0.30


def shade(normal: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """Lambertian shading under two fixed directional lights plus ambient; (M, 3) in [0, 1]."""
    light = np.full(normal.shape[0], _AMBIENT)
    for direction, strength in _LIGHTS:
        light = light + strength * np.clip(normal @ direction, 0.0, None)
    return np.clip(albedo * light[:, None], 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Sphere:
    """Sphere with a latitude/longitude checker texture of `checks` cells around the equator."""

    center: tuple[float, float, float]
    radius: float
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    checks: int = 0

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - np.asarray(self.center)
        b = np.einsum("ij,ij->i", oc, d)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius ** 2
        disc = b * b - c
        t = np.full(o.shape[0], np.inf)
        ok = disc > 0
        t_hit = -b[ok] - np.sqrt(disc[ok])
        t[ok] = np.where(t_hit > _EPS, t_hit, np.inf)
        return t

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (p - np.asarray(self.center)) / self.radius
        if self.checks <= 0:
            return n, np.broadcast_to(np.asarray(self.color_a), n.shape)
        lon = np.arctan2(n[:, 1], n[:, 0]) / (2 * np.pi) + 0.5
        lat = np.arcsin(np.clip(n[:, 2], -1, 1)) / np.pi + 0.5
        parity = (np.floor(lon * self.checks) + np.floor(lat * self.checks / 2)) % 2
        albedo = np.where(parity[:, None] > 0, np.asarray(self.color_a), np.asarray(self.color_b))
        return n, albedo


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box with a solid 3D checker of cell size `cell` (0: plain colour)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    cell: float = 0.0

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
            t0 = (np.asarray(self.lo) - o) * inv
            t1 = (np.asarray(self.hi) - o) * inv
        t_near = np.minimum(t0, t1).max(axis=1)
        t_far = np.maximum(t0, t1).min(axis=1)
        ok = (t_near <= t_far) & (t_near > _EPS)
        return np.where(ok, t_near, np.inf)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        center, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        q = (p - center) / half
        axis = np.argmax(np.abs(q), axis=1)
        n = np.zeros_like(p)
        n[np.arange(p.shape[0]), axis] = np.sign(q[np.arange(p.shape[0]), axis])
        if self.cell <= 0:
            return n, np.broadcast_to(np.asarray(self.color_a), p.shape)
        # Nudge inside so cells on the faces do not flicker between neighbours.
        parity = np.floor((p - 1e-4 * n) / self.cell).sum(axis=1) % 2
        albedo = np.where(parity[:, None] > 0, np.asarray(self.color_a), np.asarray(self.color_b))
        return n, albedo


@dataclass(frozen=True, slots=True)
class Cylinder:
    """Capped cylinder along world axis `axis` (0=x, 1=y, 2=z), with rings of length `ring`."""

    axis: int
    center: tuple[float, float]          # position in the two other axes, in increasing order
    radius: float
    lo: float
    hi: float
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    ring: float = 0.0

    def _split(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        others = [k for k in range(3) if k != self.axis]
        return v[:, others], v[:, self.axis]

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        ouv, ow = self._split(o)
        duv, dw = self._split(d)
        ouv = ouv - np.asarray(self.center)
        a = np.einsum("ij,ij->i", duv, duv)
        b = np.einsum("ij,ij->i", ouv, duv)
        c = np.einsum("ij,ij->i", ouv, ouv) - self.radius ** 2
        disc = b * b - a * c
        t = np.full(o.shape[0], np.inf)
        ok = (disc > 0) & (a > 1e-12)
        t_side = np.full(o.shape[0], np.inf)
        t_side[ok] = (-b[ok] - np.sqrt(disc[ok])) / a[ok]
        w = ow + t_side * dw
        side_ok = ok & (t_side > _EPS) & (w >= self.lo) & (w <= self.hi)
        t = np.where(side_ok, t_side, t)
        with np.errstate(divide="ignore", invalid="ignore"):
            for plane in (self.lo, self.hi):
                t_cap = (plane - ow) / np.where(np.abs(dw) < 1e-12, 1e-12, dw)
                uv = ouv + t_cap[:, None] * duv
                cap_ok = (t_cap > _EPS) & (np.einsum("ij,ij->i", uv, uv) <= self.radius ** 2)
                t = np.where(cap_ok & (t_cap < t), t_cap, t)
        return t

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        puv, pw = self._split(p)
        rel = puv - np.asarray(self.center)
        others = [k for k in range(3) if k != self.axis]
        n = np.zeros_like(p)
        on_cap = (pw <= self.lo + 1e-5) | (pw >= self.hi - 1e-5)
        radial = rel / np.maximum(np.linalg.norm(rel, axis=1, keepdims=True), 1e-12)
        n[:, others[0]] = np.where(on_cap, 0.0, radial[:, 0])
        n[:, others[1]] = np.where(on_cap, 0.0, radial[:, 1])
        n[:, self.axis] = np.where(on_cap, np.where(pw >= self.hi - 1e-5, 1.0, -1.0), 0.0)
        if self.ring <= 0:
            return n, np.broadcast_to(np.asarray(self.color_a), p.shape)
        parity = np.floor((pw - self.lo) / self.ring) % 2
        albedo = np.where(parity[:, None] > 0, np.asarray(self.color_a), np.asarray(self.color_b))
        return n, albedo


Primitive = Sphere | Box | Cylinder


def trace(prims: tuple[Primitive, ...], o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour (N, 3) and coverage (N,) of rays o, d (N, 3) against the primitives."""
    ts = np.stack([p.hit(o, d) for p in prims])            # (P, N)
    which = np.argmin(ts, axis=0)
    t = ts[which, np.arange(o.shape[0])]
    hit = np.isfinite(t)
    rgb = np.zeros_like(o)
    for k, prim in enumerate(prims):
        sel = hit & (which == k)
        if not sel.any():
            continue
        pts = o[sel] + t[sel, None] * d[sel]
        normal, albedo = prim.surface(pts)
        rgb[sel] = shade(normal, albedo)
    return rgb, hit.astype(np.float64)
