"""``--torch-compile``: the attacks' forward and backward passes through ``torch.compile``.

The attacks form batches of many sizes (reference batches, merged batches, the shrinking set of robust
points). The model is compiled with only the batch dimension symbolic, and every batch is padded up to one
of a few bucket sizes (four per doubling) so that CUDA graphs (modes ``reduce-overhead`` / ``max-autotune``)
are recorded for a handful of shapes rather than one per batch. Padding rows copy the first image; in eval
mode every image's logits depend on that image alone, and the padded rows' outputs are dropped before any
loss, so they change nothing but the work done (at most a third more).

Clean predictions and fp32 checks keep the eager model: compiled kernels may round differently.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.errors import BadInputError

from .. import devices
from .engine import AttackView

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SMALLEST_BUCKET = 8


def bucket_size(n: int) -> int:
    """The padded batch size for ``n`` images: n rounded up to a multiple of a quarter of its power of two."""
    if n <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    step = max(1, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def _keep_backward_buffers() -> None:
    """FAB differentiates one forward once per class (``retain_graph=True``), which compiled backwards refuse
    when they donate their saved buffers. The backward is compiled lazily, at its first call inside the
    attacks, so the switch is set for the process (a memory saving of compiled backwards, not a result)."""
    from torch._functorch import config

    if hasattr(config, "donated_buffer"):   # absent on older PyTorch, which donates nothing
        config.donated_buffer = False


class PaddedBatches(nn.Module):
    """Calls the compiled ``module`` on NCHW-contiguous batches padded to :func:`bucket_size`, batch
    dimension marked dynamic; returns the rows of the real images."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return self.module(x)
        size = bucket_size(n)
        if size > n:
            x = torch.cat([x, x[:1].detach().expand(size - n, *x.shape[1:])])
        x = x.contiguous()   # one memory layout: each layout would be another compiled graph
        torch._dynamo.maybe_mark_dynamic(x, 0)   # a model that needs a fixed batch size gets one graph per bucket
        # a copy: CUDA graphs (reduce-overhead) overwrite their outputs at the next replay, and the attacks
        # keep logits across model calls
        return self.module(x)[:n].clone()


def compiled_for_attacks(model: nn.Module, mode: str | None, image_shape: tuple[int, ...],
                         device: torch.device, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """The model the attacks call: ``model`` itself when ``mode`` is None, else its compiled, padded form.

    Compiled here — forward, forward+backward and a retained-graph backward, under the attacks' autocast
    (call it under their TF32 setting too) — so that a model or platform torch.compile cannot handle fails
    with a clear message before any attack runs.
    """
    if mode is None:
        return model
    if mode not in COMPILE_MODES:
        raise BadInputError(f"unknown torch.compile mode {mode!r}", hint=f"use one of {', '.join(COMPILE_MODES)}")
    _keep_backward_buffers()
    padded = PaddedBatches(torch.compile(model, mode=mode))
    as_attacked = AttackView(padded, autocast_dtype)   # the attacks' autocast, as the runner wraps it
    x = torch.zeros(SMALLEST_BUCKET, *image_shape, device=device)
    try:
        with torch.no_grad():
            as_attacked(x)
        with torch.enable_grad():
            x.requires_grad_(True)
            out = as_attacked(x)
            torch.autograd.grad(out[:, 0].sum(), [x], retain_graph=True)   # FAB's per-class gradients
            torch.autograd.grad(out.sum(), [x])
    except Exception as exc:  # backend, C++ compiler, unsupported operator: torch.compile raises many kinds
        if devices.is_out_of_memory(exc):
            raise   # the runner's out-of-memory handling applies
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise BadInputError(f"torch.compile (mode {mode}) failed on this model: {type(exc).__name__}: {first}",
                            hint="drop --torch-compile (the eager model computes the same attacks)") from None
    return padded
