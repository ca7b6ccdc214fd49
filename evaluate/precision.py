"""The arithmetic an evaluation runs in: TF32 and cuDNN switches (global on CUDA) and the strict fp32 of checks.

PyTorch enables TF32 for cuDNN convolutions by default; a 'fp32' run must turn it off, a 'tf32' run on, and
both must restore the process's setting afterwards. On a GPU every run also asks cuDNN for deterministic
convolution algorithms (``cudnn.deterministic=True``, ``cudnn.benchmark=False``, restored afterwards, recorded
in the record's ``extra["cudnn"]``): the same run on the same GPU model, driver and library versions then
repeats bit for bit. Across GPU models or library versions results may differ by floating-point rounding.
bf16 is autocast, applied by the attacks' model view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import devices


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """On a GPU: TF32 on for 'tf32', off otherwise, deterministic cuDNN; restored on exit. Nothing on a CPU."""
    if not devices.is_gpu(device):
        yield
        return
    b = torch.backends
    old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    on = precision == "tf32"
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = on
    b.cudnn.deterministic, b.cudnn.benchmark = True, False
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = old


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    with precision_mode("fp32", device):
        yield


def tf32_in_effect(precision: str, device: torch.device) -> dict[str, bool]:
    on = devices.is_gpu(device) and precision == "tf32"
    return {"matmul": on, "cudnn": on}


def cudnn_in_effect(device: torch.device) -> dict[str, bool] | None:
    """The cuDNN switches the attacks ran under (None on a CPU, where there is no cuDNN)."""
    return {"deterministic": True, "benchmark": False} if devices.is_gpu(device) else None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype the attacks run under (None: full precision)."""
    return torch.bfloat16 if precision == "bf16" else None
