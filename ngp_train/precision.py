"""Mixed precision per backend, chosen so late-training gradients survive.

Late in training a sample's colour gradient is ~1e-7…1e-9 (the loss is a mean over ~10^5 rays
of small errors). fp16's smallest subnormal is ~6e-8, so a gradient that passes through an fp16
tensor unscaled rounds to zero and that part of the field stops learning.

- torch backend on CUDA: bf16 autocast. bf16 has fp32's exponent range, so nothing underflows
  and no loss scale is needed; its 8-bit mantissa costs ~0.4% relative error per gradient,
  far below Adam's own noise. The hash table and its scatter-add stay fp32 (autocast leaves
  elementwise ops and `embedding_bag` in fp32), only the MLP matmuls run in bf16.
- tcnn backend: tiny-cuda-nn computes in fp16 and returns fp16 outputs, so the gradient reaching
  its backward has already been cast to fp16 (tcnn's internal ×128 scale is applied after that
  cast and cannot save it). A dynamic GradScaler multiplies the loss first (as nerfacc does with
  tcnn); the fused Adam unscales inside its kernel and skips steps with inf/nan, on the device,
  without a host synchronisation.
- CPU: fp32. CPU autocast is not faster for these small matmuls and fp32 needs no scaling. bf16
  was tried on a CPU with native bf16 matmuls (AVX512-BF16): oneDNN builds a kernel per matrix
  shape and the sample count changes every step; even with the rows padded to a few shapes it
  ran fewer steps per second on two threads than fp32, and learned less per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Precision:
    autocast_dtype: torch.dtype | None     # None: fp32, no autocast
    loss_scaling: bool                     # multiply the loss by a dynamic GradScaler scale
    reason: str

    @property
    def name(self) -> str:
        if self.autocast_dtype is None:
            return "fp16+loss-scale" if self.loss_scaling else "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype] + (
            "+loss-scale" if self.loss_scaling else "")


# The first scale (torch's default, 2^16): a 1e-9 gradient becomes ~6.6e-5, an fp16 normal number
# (with nerfacc's 2^10 it would be a subnormal with ~6% quantisation). An early overflow only skips
# that step and halves the scale; it doubles again after 2000 finite steps.
INITIAL_LOSS_SCALE = 2.0 ** 16


def precision_for(device_type: str, backend: str) -> Precision:
    """The precision scheme for a device type ("cpu"/"cuda") and a backend ("torch"/"tcnn")."""
    if device_type != "cuda":
        return Precision(None, False, "CPU: fp32 (autocast is not faster here and needs no scaling)")
    if backend == "tcnn":
        # Autocast does not reach into tcnn's kernels; they are fp16 regardless. The torch parts
        # (marching, compositing) stay fp32.
        return Precision(None, True, "tcnn returns fp16: dynamic loss scaling keeps small gradients")
    return Precision(torch.bfloat16, False, "torch on CUDA: bf16 autocast, fp32's exponent range, no scaling")


def resolve_precision(name: str, device_type: str, backend: str) -> Precision:
    """`name` from TrainConfig.precision: "auto" (precision_for) or a forced scheme (tests, A/B)."""
    if name == "auto":
        return precision_for(device_type, backend)
    if name == "fp32":
        return Precision(None, False, "forced fp32")
    if name == "bf16":
        return Precision(torch.bfloat16, False, "forced bf16 autocast")
    if name == "fp16-scaled":
        return Precision(torch.float16, True, "forced fp16 autocast with dynamic loss scaling")
    raise ValueError(f"unknown precision {name!r}")


def make_grad_scaler(device_type: str, p: Precision) -> torch.amp.GradScaler | None:
    if not p.loss_scaling:
        return None
    return torch.amp.GradScaler(device_type, init_scale=INITIAL_LOSS_SCALE)
