"""The values the controller validates an experiments file against: scene names, backends,
devices. Standard library only, so the controller can read them without importing torch (it
reads them from here instead of keeping its own copies).
"""
from __future__ import annotations

# Generated scenes (`python -m ngp_train synth --scene`), "default" first; synth.py builds one per
# name and a test keeps the two in step.
SCENES: tuple[str, ...] = ("default", "spheres", "rods", "blocks")
BACKENDS: tuple[str, ...] = ("auto", "torch", "tcnn")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LOSSES: tuple[str, ...] = ("l2", "huber")
FIELD_KINDS: tuple[str, ...] = ("ngp", "pe")
# Mixed-precision schemes (TrainConfig.precision); "auto" picks per device and backend (precision.py).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16-scaled")
