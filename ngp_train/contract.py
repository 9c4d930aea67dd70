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

# TrainConfig fields an experiment may set under `train:` (experiments.yaml), each with its kind
# ("int", "num", "str", "bool"), the values allowed (text kinds) and bounds (numbers). The
# settings with keys of their own (steps, backend, device, max_seconds, downscale, seed) and
# `eval` are not here. tests/test_ngp_contract.py holds this equal to TrainConfig.
TRAIN_OPTIONS: dict[str, tuple[str, tuple[str, ...], float | None, float | None]] = {
    "loss": ("str", LOSSES, None, None),
    "lr": ("num", (), 0.0, 10.0),
    "field_kind": ("str", FIELD_KINDS, None, None),
    "log2_hashmap_size": ("int", (), 10, 26),
    "max_resolution": ("num", (), 16.0, 65536.0),
    "occupancy_resolution": ("int", (), 8, 512),
    "march_steps": ("int", (), 8, 4096),
    "target_samples_per_step": ("int", (), 256, 1 << 24),
    "use_occupancy": ("bool", (), None, None),
    "snapshot_every_s": ("num", (), 1.0, 86400.0),
    "progress_every": ("int", (), 1, 100_000),
    "eval_max_frames": ("int", (), 1, 100_000),
    "precision": ("str", PRECISIONS, None, None),
    "march_buffer_multiple": ("int", (), 1, 64),
    "early_stop": ("bool", (), None, None),
    "sync_free": ("bool", (), None, None),
}
