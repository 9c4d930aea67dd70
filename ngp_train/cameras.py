"""Pinhole cameras in the NeRF-synthetic (Blender) convention.

`transform_matrix` is camera-to-world; the camera looks along its local -Z with +Y up (OpenGL).
Pixel (i, j) is sampled at its centre (i + 0.5, j + 0.5), as instant-ngp does.
"""
from __future__ import annotations

import math

import numpy as np

BLENDER_CAMERA_ANGLE_X = 0.6911112070083618


def focal_from_angle(width: int, camera_angle_x: float) -> float:
    """Focal length in pixels for a horizontal field of view `camera_angle_x` (radians)."""
    return 0.5 * width / math.tan(0.5 * camera_angle_x)


def look_at_origin(position: np.ndarray) -> np.ndarray:
    """Camera-to-world (4, 4) for a camera at `position` (3,) looking at the origin, world +Z up."""
    z = position / np.linalg.norm(position)
    up = np.array([0.0, 0.0, 1.0])
    if abs(float(z @ up)) > 0.999:
        up = np.array([0.0, 1.0, 0.0])
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, position
    return c2w


def sphere_position(radius: float, azimuth_rad: float, elevation_rad: float) -> np.ndarray:
    """Point on a sphere around the origin (Blender world, +Z up)."""
    ce = math.cos(elevation_rad)
    return radius * np.array([ce * math.cos(azimuth_rad), ce * math.sin(azimuth_rad),
                              math.sin(elevation_rad)])


def camera_rays_np(c2w: np.ndarray, width: int, height: int, focal: float,
                   supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World-space rays through a (supersample × supersample) grid inside each pixel.

    Returns origins (H, W, S*S, 3) and unit directions (H, W, S*S, 3).
    """
    s = supersample
    sub = (np.arange(s) + 0.5) / s
    i = np.arange(width)[None, :, None, None] + sub[None, None, None, :]
    j = np.arange(height)[:, None, None, None] + sub[None, None, :, None]
    i, j = np.broadcast_arrays(i, j)
    i = i.reshape(height, width, s * s)
    j = j.reshape(height, width, s * s)
    d_cam = np.stack([(i - 0.5 * width) / focal, -(j - 0.5 * height) / focal,
                      -np.ones_like(i)], axis=-1)
    d = d_cam @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(c2w[:3, 3], d.shape)
    return o, d
