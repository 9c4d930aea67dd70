"""Radiance fields: Instant-NGP's (hash grid + two small MLPs) and a positional-encoding baseline.

Both take positions in the unit cube [0, 1]³ and unit directions, and expose
`density(x) -> (sigma (N,), geo (N, G))` and `forward(x, d) -> (rgb (N, 3), sigma (N,))`.
"""
from __future__ import annotations

import torch
from torch import nn

from .encoding import HashGridEncoding, spherical_harmonics_deg4
from .field_config import FieldConfig, trunc_exp

__all__ = ["FieldConfig", "NgpField", "PositionalField", "make_field", "trunc_exp"]


def _mlp(n_in: int, width: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """tiny-cuda-nn style MLP: no biases, ReLU between layers, no output activation."""
    layers: list[nn.Module] = []
    dims = [n_in] + [width] * n_hidden
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], n_out, bias=False))
    return nn.Sequential(*layers)


class NgpField(nn.Module):
    """Hash grid → density MLP (1 hidden layer) → [SH(d), geo] → colour MLP (2 hidden layers)."""

    def __init__(self, cfg: FieldConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoding = HashGridEncoding(cfg.grid, seed=seed)
        self.density_net = _mlp(cfg.grid.out_dim, cfg.hidden, 1, cfg.geo_features)
        self.color_net = _mlp(16 + cfg.geo_features, cfg.hidden, cfg.color_hidden_layers, 3)

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3) in [0, 1]³ → sigma (N,), geo (N, geo_features)."""
        h = self.density_net(self.encoding(x))
        return trunc_exp(h[:, 0].float()), h

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3), d (N, 3) unit → rgb (N, 3) in [0, 1], sigma (N,)."""
        sigma, geo = self.density(x)
        sh = spherical_harmonics_deg4(d).to(geo.dtype)
        rgb = torch.sigmoid(self.color_net(torch.cat([sh, geo], dim=-1)).float())
        return rgb, sigma

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.density_net.parameters()) + list(self.color_net.parameters())

    def grid_parameters(self) -> list[nn.Parameter]:
        return [self.encoding.table]


def positional_encoding(x: torch.Tensor, n_bands: int) -> torch.Tensor:
    """[x, sin(2^k π x), cos(2^k π x)] for k < n_bands; (N, D) → (N, D·(1 + 2·n_bands))."""
    freqs = (2.0 ** torch.arange(n_bands, dtype=x.dtype, device=x.device)) * torch.pi
    xb = x.unsqueeze(-1) * freqs                                   # (N, D, B)
    return torch.cat([x, torch.sin(xb).flatten(1), torch.cos(xb).flatten(1)], dim=-1)


class PositionalField(nn.Module):
    """The original NeRF's MLP, smaller: PE(x) → depth×width ReLU → sigma, feature; + PE(d) → rgb."""

    def __init__(self, cfg: FieldConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if seed is not None:
            torch.manual_seed(seed)
        n_in = 3 * (1 + 2 * cfg.pe_pos_bands)
        layers: list[nn.Module] = []
        dims = [n_in] + [cfg.pe_width] * cfg.pe_depth
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.sigma_head = nn.Linear(cfg.pe_width, 1)
        self.feature = nn.Linear(cfg.pe_width, cfg.pe_width)
        self.rgb_head = nn.Sequential(nn.Linear(cfg.pe_width + 3 * (1 + 2 * cfg.pe_dir_bands), cfg.pe_width // 2),
                                      nn.ReLU(inplace=True), nn.Linear(cfg.pe_width // 2, 3))

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(positional_encoding(x * 2 - 1, self.cfg.pe_pos_bands))
        return trunc_exp(self.sigma_head(h)[:, 0]), h

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, h = self.density(x)
        f = torch.cat([self.feature(h), positional_encoding(d, self.cfg.pe_dir_bands)], dim=-1)
        return torch.sigmoid(self.rgb_head(f)), sigma

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def grid_parameters(self) -> list[nn.Parameter]:
        return []


def make_field(cfg: FieldConfig, backend: str = "torch", seed: int | None = None) -> nn.Module:
    """Build the field for `backend` ("torch" or "tcnn"; tcnn needs CUDA and tinycudann)."""
    if cfg.kind == "pe":
        return PositionalField(cfg, seed)
    if backend == "tcnn":
        from .tcnn_backend import TcnnField

        return TcnnField(cfg, seed)
    if seed is not None:
        torch.manual_seed(seed)
    return NgpField(cfg, seed)
