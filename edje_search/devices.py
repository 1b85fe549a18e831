"""Device and precision choices shared by indexing, search, training and evaluation.

One rule for every path: the device asked for, else CUDA when present, else the CPU. One
precision rule, :func:`precision_autocast`, for indexing, search, evaluation, calibration and
training: "auto" (what inference uses unless told otherwise) is autocast to bf16 on GPUs that
have it, else fp16 on CUDA, and fp32 on the CPU, where this torch build's bf16 matmuls are
several times slower than fp32 (docs/benchmarks.md); training defaults to "fp32" and takes
"bf16" on request.
"""
from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS
from .errors import BadInput


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else CUDA when present, else the CPU.

    Raises BadInput for a CUDA device on a machine without one (instead of a late torch error).
    """
    if device and str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"device {device!r} asked for, but torch sees no CUDA GPU here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype inference runs in on ``device`` (None: no autocast, fp32).

    ``auto``: bf16 on GPUs that support it, else fp16 on CUDA; fp32 on the CPU.
    """
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def precision_autocast(device: torch.device, precision: str = "auto"):
    """Context manager: autocast to :func:`autocast_dtype` on ``device``, or nothing for fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that overlaps with compute on CUDA (pinned source, non-blocking)."""
    if device.type != "cuda":
        return batch.to(device)
    if not batch.is_pinned():
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)
