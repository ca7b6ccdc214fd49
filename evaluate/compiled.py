"""``--torch-compile``: the attacks' forward and backward passes through ``torch.compile``.

The attacks form batches of many sizes (reference batches, merged batches, the shrinking set of robust
points). The model is compiled once with a symbolic batch size, and every batch is padded up to one of a
few bucket sizes (four per doubling) so that CUDA graphs (modes ``reduce-overhead`` / ``max-autotune``) are
recorded for a handful of shapes rather than one per batch. Padding rows copy the first image; in eval mode
every image's logits depend on that image alone, and the padded rows' outputs are dropped before any loss,
so they change nothing but the work done (at most a third more).

Clean predictions and fp32 checks keep the eager model: compiled kernels may round differently.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from zoo.errors import BadInputError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SMALLEST_BUCKET = 8


def bucket_size(n: int) -> int:
    """The padded batch size for ``n`` images: n rounded up to a multiple of a quarter of its power of two."""
    if n <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    step = max(1, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


class PaddedBatches(nn.Module):
    """Calls ``module`` on batches padded to :func:`bucket_size`; returns the rows of the real images."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = bucket_size(n)
        if n == 0 or size == n:
            return self.module(x)
        pad = x[:1].detach().expand(size - n, *x.shape[1:])
        return self.module(torch.cat([x, pad]))[:n]


def compiled_for_attacks(model: nn.Module, mode: str | None, image_shape: tuple[int, ...],
                         device: torch.device, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """The model the attacks call: ``model`` itself when ``mode`` is None, else its compiled, padded form.

    Compiled here, forward and forward+backward under the attacks' autocast, so that a model or platform
    torch.compile cannot handle fails with a clear message before any attack runs.
    """
    if mode is None:
        return model
    if mode not in COMPILE_MODES:
        raise BadInputError(f"unknown torch.compile mode {mode!r}", hint=f"use one of {', '.join(COMPILE_MODES)}")
    padded = PaddedBatches(torch.compile(model, mode=mode, dynamic=True))
    x = torch.zeros(SMALLEST_BUCKET, *image_shape, device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            padded(x)
        with torch.enable_grad(), autocast:
            x.requires_grad_(True)
            torch.autograd.grad(padded(x).float().sum(), [x])
    except Exception as exc:  # backend, C++ compiler, unsupported operator: torch.compile raises many kinds
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise BadInputError(f"torch.compile (mode {mode}) failed on this model: {type(exc).__name__}: {first}",
                            hint="drop --torch-compile (the eager model computes the same attacks)") from None
    return padded
