"""The field's configuration and `trunc_exp`, shared by the torch field (field.py) and the
tiny-cuda-nn one (tcnn_backend.py), so that neither imports the other."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .encoding import HashGridConfig


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)), so a large pre-activation cannot blow up."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


@dataclass(frozen=True, slots=True)
class FieldConfig:
    kind: str = "ngp"                     # "ngp" or "pe" (positional-encoding NeRF baseline)
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden: int = 64                      # width of both MLPs
    geo_features: int = 16                # density MLP outputs (first one is log-density)
    color_hidden_layers: int = 2
    pe_width: int = 128                   # baseline: width, depth, frequency bands
    pe_depth: int = 4
    pe_pos_bands: int = 10
    pe_dir_bands: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> FieldConfig:
        d = dict(d)
        d["grid"] = HashGridConfig(**d.get("grid", {}))
        return FieldConfig(**d)
