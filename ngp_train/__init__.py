"""Instant-NGP in PyTorch (hash grid with tiny-cuda-nn semantics, occupancy-grid marching),
training on CPU or CUDA (tiny-cuda-nn when importable). See docs/contracts.md §1 for the API."""
from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
