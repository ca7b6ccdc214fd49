"""Every question the evaluation asks a GPU, in one place.

The runner's GPU-only logic (device choice under torchrun, the memory probe, out-of-memory back-off, TF32
and cuDNN switches, channels_last by default on GPUs; see :func:`default_channels_last`) branches on
:func:`is_gpu` and reaches ``torch.cuda`` only through the functions below. That keeps the branches testable
without a GPU: ``tests/test_gpu_paths.py`` replaces this module's functions with a fake CUDA device whose
tensors live on the CPU (``torch.device("cpu", N)`` stands for ``cuda:N`` there). Real CUDA runs go through
``bench/gpu_check.sh``.
"""

from __future__ import annotations

import platform

import torch

#: Messages of allocation failures that cuDNN / cuBLAS (and some CUDA kernels) raise as a plain RuntimeError
#: rather than ``torch.cuda.OutOfMemoryError``; they get the same back-off.
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def default_channels_last(device: torch.device, precision: str) -> bool:
    """channels_last where it is the faster layout: on GPUs, and for bf16 on a CPU (oneDNN's bf16 kernels;
    WRN-28-10's attack passes 12-23% faster, bench/RESULTS.md). fp32 on a CPU keeps NCHW."""
    return is_gpu(device) or precision == "bf16"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a GPU allocation failure, whichever library reported it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if type(exc) is not RuntimeError:
        return False
    text = str(exc)
    return any(m in text for m in _OOM_MESSAGES)


def available() -> bool:
    return torch.cuda.is_available()


def count() -> int:
    return torch.cuda.device_count()


def gpu(index: int) -> torch.device:
    """The torch device of GPU ``index``."""
    return torch.device("cuda", index)


def is_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def kind(device: torch.device) -> str:
    """'cuda' or 'cpu': what a run records as its device (and what resume and merge start from)."""
    return "cuda" if is_gpu(device) else "cpu"


def set_current(device: torch.device) -> None:
    """Make ``device`` the process's current GPU (torchrun: each rank its own LOCAL_RANK)."""
    torch.cuda.set_device(device)


def name(device: torch.device) -> str:
    if is_gpu(device):
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def total_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def synchronize(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.synchronize(device)


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def memory_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


def max_memory_allocated(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device)
