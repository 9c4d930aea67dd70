"""Image metrics in the mip-NeRF convention.

PSNR per image (data range 1), then averaged over images. SSIM with an 11-tap Gaussian window
(σ = 1.5), k1 = 0.01, k2 = 0.03, 'valid' filtering (no padding), averaged over the map and RGB.
Images are (H, W, 3) float arrays or tensors in [0, 1]; RGBA files are composited on white.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NgpError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrameMetrics:
    frame: str
    psnr: float
    ssim: float


def _as_tensor(img):  # noqa: ANN001, ANN202 - numpy or torch in, float64 torch out
    import torch

    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.asarray(img))
    return t.detach().to(torch.float64).cpu()


def psnr(pred, gt) -> float:  # noqa: ANN001
    """-10·log10(MSE) over all pixels and channels; +inf for identical images."""
    a, b = _as_tensor(pred), _as_tensor(gt)
    if a.shape != b.shape:
        raise NgpError(f"psnr: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def _gaussian_1d(size: int = 11, sigma: float = 1.5):  # noqa: ANN202
    import torch

    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(pred, gt, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:  # noqa: ANN001
    """Mean SSIM over valid positions and channels (separable Gaussian filter, no padding)."""
    import torch.nn.functional as F

    a, b = _as_tensor(pred), _as_tensor(gt)
    if a.shape != b.shape or a.ndim != 3:
        raise NgpError(f"ssim: need two (H, W, C) images of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[0] < window or a.shape[1] < window:
        raise NgpError(f"ssim: images must be at least {window}x{window} pixels")
    c = a.shape[2]
    g = _gaussian_1d(window, sigma)
    x = torch_stack_channels(a, b)                              # (5C, 1, H, W)

    def blur(t):  # noqa: ANN001, ANN202
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    m = blur(x)
    mu_a, mu_b, e_aa, e_bb, e_ab = m.split(c, dim=0)
    var_a, var_b, cov = e_aa - mu_a ** 2, e_bb - mu_b ** 2, e_ab - mu_a * mu_b
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def torch_stack_channels(a, b):  # noqa: ANN001, ANN201
    """(H, W, C) pair → (5C, 1, H, W): a, b, a², b², ab per channel, for one batched blur."""
    import torch

    ch = lambda t: t.permute(2, 0, 1).unsqueeze(1)  # noqa: E731
    return torch.cat([ch(a), ch(b), ch(a * a), ch(b * b), ch(a * b)], dim=0)


def _natural_key(stem: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", stem))


def read_rgb(path: Path, background: str = "white", size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]; RGBA composited on `background`; bicubic resize to `size` (w, h)."""
    from PIL import Image

    bg = {"white": 1.0, "black": 0.0}.get(background)
    if bg is None:
        raise NgpError(f"background must be 'white' or 'black', got {background!r}")
    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
    if size is not None and (rgba.shape[1], rgba.shape[0]) != size:
        chans = [np.asarray(Image.fromarray(np.asarray(ch, dtype=np.float32)).resize(size, Image.BICUBIC))
                 for ch in np.moveaxis(rgba, -1, 0)]
        rgba = np.clip(np.stack(chans, axis=-1).astype(np.float64), 0.0, 1.0)
    return rgba[..., :3] * rgba[..., 3:] + bg * (1.0 - rgba[..., 3:])


def _images(d: Path) -> dict[str, Path]:
    if not d.is_dir():
        raise NgpError(f"{d}: directory does not exist")
    return {p.stem: p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")}


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, *, background: str = "white") -> list[FrameMetrics]:
    """PSNR and SSIM for every image pair with the same stem, in natural order (r_2 before r_10).

    A prediction whose size differs from its ground truth is resampled bicubically first.
    """
    pred, gt = _images(Path(pred_dir)), _images(Path(gt_dir))
    common = sorted(set(pred) & set(gt), key=_natural_key)
    if not common:
        raise NgpError(f"no image in {pred_dir} has a ground truth with the same name in {gt_dir}")
    missing = sorted(set(gt) - set(pred), key=_natural_key)
    if missing:
        log.warning("%d ground-truth frames have no prediction (first: %s)", len(missing), missing[0])
    out = []
    for stem in common:
        g = read_rgb(gt[stem], background)
        p = read_rgb(pred[stem], background, size=(g.shape[1], g.shape[0]))
        out.append(FrameMetrics(stem, psnr(p, g), ssim(p, g)))
    return out


def write_metrics_csv(rows: list[FrameMetrics], path: str | Path) -> Path:
    """Write frame,psnr,ssim rows; return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = ["frame,psnr,ssim"] + [f"{r.frame},{r.psnr:.6f},{r.ssim:.6f}" for r in rows]
    p.write_text("\n".join(lines) + "\n")
    return p


def means(rows: list[FrameMetrics]) -> tuple[float, float]:
    """(mean PSNR, mean SSIM) over frames."""
    if not rows:
        raise NgpError("no frames to average")
    return (float(np.mean([r.psnr for r in rows])), float(np.mean([r.ssim for r in rows])))
