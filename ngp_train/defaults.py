"""Device-dependent defaults: the paper's values on CUDA, scaled to the images on CPU.

On a GPU the instant-ngp configuration is used as published (T = 2^19, N_max = 2048, 128³
occupancy grid, √3/1024 steps, 2^18 samples per step). On CPU the costly parts are scaled to what
the images can show (see cpu-training-notes): a smaller table, N_max and marching step following
the image resolution, a 64³ grid and ~8k samples per step (twice the steps of 16k in the same time: the
default scene reaches a given PSNR ~20% sooner, bench/bench_ngp.py). The marching step is √3/(2·size):
about 0.9 of a pixel's footprint at the object for the Blender camera (instant-ngp's √3/1024 at
800 px is ~1.4 footprints); the former √3/(4·size), ~0.45 footprints, marched twice the samples
per ray for no visible detail and so trained half the rays per step (the default scene was ~1.5-2
dB lower at 24 s). The grid follows instant-ngp's update schedule, but after one
full pass each update visits 1/16 uniform + 1/16 occupied cells (a full 64³ pass costs as much as
~5 training steps here, and the schedule asks for ~70 of them in the first 256 steps; 1/32 + 1/32 was
tried: up to 2 dB better before 10 s, but 0.7-0.9 dB worse at 45 s). The chosen values are recorded in the
snapshot and in summary.json.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class DeviceDefaults:
    log2_hashmap_size: int
    max_resolution: float
    occupancy_resolution: int
    march_steps: int
    target_samples_per_step: int
    grid_update_every: int | None        # None: instant-ngp's min(16, max(1, step/16))
    grid_warmup_steps: int               # steps during which every cell is updated
    grid_sample_fraction: float          # after warm-up: this fraction uniform + this fraction occupied
    # Marched samples are capped at this multiple of the target (the target counts compacted
    # samples, those in front of T < 1e-4, as instant-ngp's batch does). On CPU there is no
    # compaction pass (it costs more than it saves there), so marched = compacted and the
    # multiple is 1.
    march_buffer_multiple: int = 1
    early_stop: bool = False             # compaction: drop samples behind T < 1e-4 before the field
    sync_free: bool = False              # fixed-size buffers, counts read on logging steps (batch.py)

    def to_dict(self) -> dict:
        return asdict(self)


def device_defaults(device_type: str, image_size: int) -> DeviceDefaults:
    """Defaults for `device_type` ("cpu" or "cuda") and the larger image side in pixels."""
    if device_type == "cuda":
        # 8x: instant-ngp sizes its marched buffer at 16x the target as a worst case; 8x
        # keeps the gradient-free density pass over it (bf16 torch, no tcnn) to about the cost of
        # the training pass while leaving room for ~8 marched per compacted sample.
        return DeviceDefaults(19, 2048.0, 128, 1024, 1 << 18, None, 256, 0.25, march_buffer_multiple=8,
                              early_stop=True, sync_free=True)
    return DeviceDefaults(
        log2_hashmap_size=16 if image_size <= 128 else 17,
        max_resolution=float(min(2048, max(64, 8 * image_size))),
        occupancy_resolution=64,
        march_steps=int(min(1024, max(128, 2 * image_size))),
        target_samples_per_step=1 << 13,
        grid_update_every=None,
        grid_warmup_steps=1,
        grid_sample_fraction=0.0625,
    )
