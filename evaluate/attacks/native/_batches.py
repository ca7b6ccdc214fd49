"""The primitives every native attack shares: model calls in the engine's precision, the reference batches
inside a merged device batch with their generators, and exact streams of uniform draws.

Kept apart from the engine so the attack modules depend on these alone (no import cycle with the engine).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..engine import zero_gradient_points


# ---------------------------------------------------------------- the model as the attacks call it

@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad while attacking (input gradients only); flags restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _fp32_module(model: nn.Module) -> nn.Module:
    """The module that computes in full precision: the runner's AttackView may add its own autocast and
    call a compiled model; its ``fp32_model`` is the eager one."""
    eager = getattr(model, "fp32_model", None)
    return eager if isinstance(eager, nn.Module) else model


class ModelCalls:
    """Every model evaluation an attack makes, counted in examples, in the engine's precision.

    Logits always come back as float32 so losses, margins and comparisons are computed in full precision.
    ``confirm`` re-checks claimed successes with an fp32 forward when the attack itself ran in bf16.
    """

    def __init__(self, model: nn.Module, precision: str):
        self.model = model
        self.fp32_model = _fp32_module(model)
        self.precision = precision
        self.counts: dict[str, int] = {"forward": 0, "backward": 0, "fp32_check": 0}
        self._zero_gradients: list[Tensor] = []   # per APGD run, kept on the device until asked for

    def note_zero_gradients(self, grad: Tensor) -> None:
        """Count the points whose gradient is exactly zero (kept on the device: no sync per APGD run)."""
        self._zero_gradients.append(zero_gradient_points(grad))

    def zero_gradient_points(self) -> int:
        return int(sum(int(c) for c in self._zero_gradients))

    def _autocast(self, x: Tensor):
        if self.precision == "bf16":
            return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad(), self._autocast(x):
            out = self.model(x)
        self.counts["forward"] += x.shape[0]
        return out.float()

    def logits_fp32(self, x: Tensor) -> Tensor:
        """A full-precision forward; in fp32 mode the same as ``logits``."""
        if self.precision == "fp32":
            return self.logits(x)
        with torch.no_grad():
            out = self.fp32_model(x)
        self.counts["fp32_check"] += x.shape[0]
        return out.float()

    def loss_and_grad(self, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, per-example loss, d sum(loss) / d x), all detached."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with self._autocast(x):
                out = self.model(x)
            out = out.float()
            loss = loss_fn(out)
            (grad,) = torch.autograd.grad(loss.sum(), [x])
        self.counts["forward"] += x.shape[0]
        self.counts["backward"] += x.shape[0]
        return out.detach(), loss.detach(), grad.detach()

    def logits_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, d logits / d x) with the Jacobian shaped (n, classes, *x.shape[1:]); one backward per class."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with self._autocast(x):
                out = self.model(x)
            out = out.float()
            rows = []
            for k in range(out.shape[1]):
                pick = torch.zeros_like(out)
                pick[:, k] = 1.0
                (g,) = torch.autograd.grad(out, [x], grad_outputs=pick, retain_graph=k < out.shape[1] - 1)
                rows.append(g)
        self.counts["forward"] += x.shape[0]
        self.counts["backward"] += x.shape[0] * out.shape[1]
        return out.detach(), torch.stack(rows, dim=1)

    def confirm(self, x_adv: Tensor, y: Tensor, claimed: Tensor) -> Tensor:
        """The claimed successes that misclassify in fp32 (all of them when the attack ran in fp32)."""
        if self.precision == "fp32":
            return claimed
        idx = claimed.nonzero().squeeze(1)
        held = claimed.clone()
        if idx.numel():
            held[idx] = self.logits_fp32(x_adv[idx]).max(1)[1] != y[idx]
        return held


# ---------------------------------------------------------------- reference batches inside a merged batch

class ReferenceBatches:
    """Which reference batch each point of a merged device batch belongs to, and each batch's generator.

    The reference calls ``torch.random.manual_seed(seed)`` before every batch and then draws from the global
    CPU generator; here batch ``b`` draws from ``generators[b]``, seeded the same way, in the same order.
    """

    def __init__(self, sizes: Sequence[int], seed: int, device: torch.device):
        self.sizes = [int(s) for s in sizes]
        self.batch_of = torch.repeat_interleave(torch.arange(len(self.sizes)),
                                                torch.tensor(self.sizes, dtype=torch.long)).to(device)
        self.generators = [torch.Generator().manual_seed(int(seed)) for _ in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def counts(self, idx: Tensor) -> list[int]:
        """How many of the points ``idx`` (indices into the merged batch) each reference batch holds."""
        return torch.bincount(self.batch_of[idx], minlength=len(self.sizes)).tolist()

    def draw(self, counts: Sequence[int], tail: Sequence[int], normal: bool) -> Tensor:
        """Per batch ``torch.rand`` / ``torch.randn`` of shape (count, *tail), concatenated (CPU float32)."""
        sample = torch.randn if normal else torch.rand
        parts = [sample((n, *tail), generator=g) for n, g in zip(counts, self.generators) if n]
        return torch.cat(parts) if parts else torch.empty(0, *tail)


@functools.lru_cache(maxsize=None)
def uniform_draws_are_a_stream() -> bool:
    """True when ``torch.rand`` (float32, CPU) takes one generator output per element whatever the call size.

    Square draws a few numbers per batch per iteration; when this holds they are taken from one large draw
    (identical numbers, far fewer calls). Checked on this PyTorch build rather than assumed.
    """
    g1, g2 = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    pieces = torch.cat([torch.rand(1, generator=g1), torch.rand(3, generator=g1), torch.rand(40, generator=g1),
                        torch.rand(2, generator=g1)])
    return torch.equal(pieces, torch.rand(46, generator=g2))


class UniformStream:
    """Successive ``torch.rand`` draws from one generator, served from large chunks when that is exact."""

    def __init__(self, generator: torch.Generator, chunk: int = 1 << 16):
        self.generator = generator
        self.chunk = chunk
        self.buffer = torch.empty(0)
        self.pos = 0
        self.chunked = uniform_draws_are_a_stream()

    def take(self, n: int) -> Tensor:
        if not self.chunked:
            return torch.rand(n, generator=self.generator)
        if self.pos + n > self.buffer.numel():
            rest = self.buffer[self.pos:]
            fresh = torch.rand(max(self.chunk, n - rest.numel()), generator=self.generator)
            self.buffer, self.pos = torch.cat([rest, fresh]), 0
        out = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return out
