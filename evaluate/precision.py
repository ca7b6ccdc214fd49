"""The arithmetic an evaluation runs in: TF32 switches (global on CUDA) and the strict fp32 of every check.

PyTorch enables TF32 for cuDNN convolutions by default; a 'fp32' run must turn it off, a 'tf32' run on, and
both must restore the process's setting afterwards. bf16 is autocast, applied by the attacks' model view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 on for 'tf32', off otherwise, on CUDA; restored on exit. Nothing to switch on a CPU."""
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    with precision_mode("fp32", device):
        yield


def tf32_in_effect(precision: str, device: torch.device) -> dict[str, bool]:
    on = device.type == "cuda" and precision == "tf32"
    return {"matmul": on, "cudnn": on}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype the attacks run under (None: full precision)."""
    return torch.bfloat16 if precision == "bf16" else None
