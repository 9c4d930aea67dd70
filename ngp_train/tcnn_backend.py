"""tiny-cuda-nn backend: the same field as `field.NgpField`, fused CUDA kernels, half precision.

Importing this module never needs CUDA; constructing `TcnnField` does (and `tinycudann`).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError
from .field_config import FieldConfig, trunc_exp

log = logging.getLogger(__name__)


def tcnn_available() -> bool:
    """True when tinycudann imports and CUDA is usable."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def hash_grid_encoding_config(cfg: FieldConfig) -> dict:
    g = cfg.grid
    return {"otype": "HashGrid", "n_levels": g.n_levels, "n_features_per_level": g.n_features_per_level,
            "log2_hashmap_size": g.log2_hashmap_size, "base_resolution": g.base_resolution,
            "per_level_scale": g.per_level_scale}


def mlp_config(width: int, n_hidden: int, output_activation: str = "None") -> dict:
    return {"otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": output_activation,
            "n_neurons": width, "n_hidden_layers": n_hidden}


class TcnnField(nn.Module):
    """NgpField on tiny-cuda-nn: HashGrid+FullyFusedMLP for density, SH(4)+FullyFusedMLP for colour."""

    def __init__(self, cfg: FieldConfig, seed: int | None = None) -> None:
        super().__init__()
        if not tcnn_available():
            raise ConfigError("backend 'tcnn' needs CUDA and the tinycudann package; use --backend torch")
        import tinycudann as tcnn

        self.cfg = cfg
        s = 1337 if seed is None else int(seed)
        self.density_net = tcnn.NetworkWithInputEncoding(3, cfg.geo_features, hash_grid_encoding_config(cfg),
                                                         mlp_config(cfg.hidden, 1), seed=s)
        self.dir_encoding = tcnn.Encoding(3, {"otype": "SphericalHarmonics", "degree": 4})
        self.color_net = tcnn.Network(self.dir_encoding.n_output_dims + cfg.geo_features, 3,
                                      mlp_config(cfg.hidden, cfg.color_hidden_layers, "Sigmoid"), seed=s + 1)

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.density_net(x)
        return trunc_exp(h[:, 0].float()), h

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self.density(x)
        sh = self.dir_encoding((d + 1) * 0.5)               # tcnn's SH expects directions in [0, 1]
        rgb = self.color_net(torch.cat([sh, geo], dim=-1)).float()
        return rgb, sigma

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.color_net.parameters())

    def grid_parameters(self) -> list[nn.Parameter]:
        return list(self.density_net.parameters())
