"""APGD with the CE, DLR and targeted-DLR losses (Croce & Hein, ICML 2020), as pyautoattack runs it.

Same algorithm and the same floating-point operations as ``pyautoattack.autopgd_base`` (step 2*eps,
momentum 0.75, step halving at the shrinking checkpoints when the loss oscillates or stalls, restart from
the best point, success at any iterate), written for merged reference batches: every per-example quantity
is a tensor updated with masks, so no iteration waits for the host, and each reference batch's random start
comes from its own generator (see ``_batches.ReferenceBatches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batches import ModelCalls, ReferenceBatches


MOMENTUM = 0.75      # weight of the new step after the first iteration
STEP_FACTOR = 2.0    # initial step size, in units of eps (Linf and L2)


def unsupported(attack) -> str | None:
    """Why a pyautoattack APGD object's configuration cannot run here (None when it can)."""
    if attack.norm not in ("Linf", "L2"):
        return f"APGD with norm {attack.norm} is not implemented natively"
    if attack.eot_iter != 1:
        return "APGD with EOT (eot_iter > 1, version 'rand') is not implemented natively"
    if attack.use_largereps:
        return "APGD with the large-eps schedule is not implemented natively"
    if getattr(attack, "is_tf_model", False):
        return "TensorFlow models are not supported"
    return None


@dataclass(frozen=True)
class ApgdSettings:
    """What one APGD run needs; the checkpoint schedule defaults to the reference's fractions of n_iter."""

    norm: str
    eps: float
    n_iter: int = 100
    n_restarts: int = 1
    rho: float = 0.75
    n_target_classes: int = 9
    first_interval: int | None = None      # iterations before the first step-size check (22% of n_iter)
    min_interval: int | None = None        # the interval never shrinks below this (6%)
    interval_decrease: int | None = None   # the interval shrinks by this at every check (3%)

    def __post_init__(self):
        defaults = {"first_interval": 0.22, "min_interval": 0.06, "interval_decrease": 0.03}
        for name, share in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, max(int(share * self.n_iter), 1))

    @classmethod
    def from_reference(cls, attack) -> "ApgdSettings":
        """Read from a pyautoattack APGD object, including the schedule it fixed when it was built."""
        return cls(norm=attack.norm, eps=float(attack.eps), n_iter=int(attack.n_iter),
                   n_restarts=int(attack.n_restarts), rho=float(attack.thr_decr),
                   n_target_classes=int(getattr(attack, "n_target_classes", 9)),
                   first_interval=int(attack.n_iter_2), min_interval=int(attack.n_iter_min),
                   interval_decrease=int(attack.size_decr))


# ---------------------------------------------------------------- losses (per example)

def ce_loss(y: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def dlr_loss(y: Tensor) -> Callable[[Tensor], Tensor]:
    """Difference of logits ratio: margin of the true class over the best other, scaled by top-1 minus top-3."""
    rows = torch.arange(y.shape[0], device=y.device)

    def loss(logits: Tensor) -> Tensor:
        ordered, order = logits.sort(dim=1)
        top_is_true = (order[:, -1] == y).float()
        return -(logits[rows, y] - ordered[:, -2] * top_is_true - ordered[:, -1] * (1. - top_is_true)) / (
            ordered[:, -1] - ordered[:, -3] + 1e-12)

    return loss


def targeted_dlr_loss(y: Tensor, target: Tensor) -> Callable[[Tensor], Tensor]:
    """Targeted DLR: true-class logit minus target logit, scaled by top-1 minus the mean of top-3 and top-4."""
    rows = torch.arange(y.shape[0], device=y.device)

    def loss(logits: Tensor) -> Tensor:
        ordered = logits.sort(dim=1)[0]
        return -(logits[rows, y] - logits[rows, target]) / (
            ordered[:, -1] - .5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12)

    return loss


# ---------------------------------------------------------------- geometry

def _per_example(v: Tensor) -> Tensor:
    """A per-example vector shaped to broadcast against images."""
    return v.reshape(-1, *([1] * 3))


def _norms(v: Tensor, norm: str) -> Tensor:
    flat = v.reshape(v.shape[0], -1)   # reshape: gradients of channels_last models are not NCHW-contiguous
    return flat.abs().max(1)[0] if norm == "Linf" else (flat ** 2).sum(-1).sqrt()


def _direction(v: Tensor, norm: str) -> Tensor:
    """v scaled to unit norm (the reference's ``normalize``)."""
    return v / (_per_example(_norms(v, norm)) + 1e-12)


def random_start(x: Tensor, noise: Tensor, s: ApgdSettings) -> Tensor:
    """The reference's starting point from its uniform (Linf) or Gaussian (L2) noise, clipped to [0, 1]."""
    t = 2 * noise - 1 if s.norm == "Linf" else noise
    return (x + s.eps * _direction(t, s.norm)).clamp(0., 1.)


class _Step:
    """One APGD update: gradient step, projection, momentum step, projection."""

    def __init__(self, x: Tensor, s: ApgdSettings):
        self.x, self.norm, self.eps = x, s.norm, s.eps
        if s.norm == "Linf":
            self.low, self.high = x - s.eps, x + s.eps

    def _project(self, z: Tensor) -> Tensor:
        if self.norm == "Linf":
            return torch.clamp(torch.min(torch.max(z, self.low), self.high), 0.0, 1.0)
        d = z - self.x
        length = _per_example(_norms(d, "L2"))
        return torch.clamp(self.x + d / (length + 1e-12) * torch.clamp(length, max=self.eps), 0.0, 1.0)

    def __call__(self, x_adv: Tensor, grad: Tensor, step: Tensor, previous: Tensor, a: float) -> Tensor:
        direction = torch.sign(grad) if self.norm == "Linf" else _direction(grad, "L2")
        z = self._project(x_adv + step * direction)
        return self._project(x_adv + (z - x_adv) * a + (x_adv - previous) * (1 - a))


# ---------------------------------------------------------------- one run on a set of points

def run(calls: ModelCalls, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor], Tensor], x_start: Tensor,
        s: ApgdSettings, check_zero: bool = False) -> tuple[Tensor, Tensor]:
    """One APGD run from ``x_start``; returns (robust at every iterate, last misclassified iterate).
    ``check_zero``: count the points whose initial gradient is zero (the reference does for DLR losses)."""
    n = x.shape[0]
    take_step = _Step(x, s)
    x_adv = x_start
    x_best_adv = x_adv.clone()
    logits, loss, grad = calls.loss_and_grad(x_adv, loss_fn)
    if check_zero:
        calls.note_zero_gradients(grad)
    robust = logits.max(1)[1] == y
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    loss_history = torch.zeros(s.n_iter, n, device=x.device)
    step = torch.full((n, 1, 1, 1), STEP_FACTOR * s.eps, device=x.device)

    previous = x_adv
    interval, since_check = s.first_interval, 0
    loss_best_at_check = loss_best.clone()
    halved_at_check = torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(s.n_iter):
        x_adv, previous = take_step(x_adv, grad, step, previous, MOMENTUM if i > 0 else 1.0), x_adv
        logits, loss, grad = calls.loss_and_grad(x_adv, loss_fn)

        correct = logits.max(1)[1] == y
        robust &= correct
        x_best_adv = torch.where(_per_example(~correct), x_adv, x_best_adv)

        loss_history[i] = loss
        better = loss > loss_best
        x_best = torch.where(_per_example(better), x_adv, x_best)
        grad_best = torch.where(_per_example(better), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)

        since_check += 1
        if since_check == interval:
            rows = torch.arange(i, i - interval, -1, device=x.device)
            rises = (loss_history[rows] > loss_history[(rows - 1) % s.n_iter]).sum(0).float()
            threshold = torch.tensor(interval * s.rho, dtype=torch.float32).item()
            halve = (rises <= threshold) | (~halved_at_check & (loss_best_at_check >= loss_best))
            halved_at_check, loss_best_at_check = halve, loss_best.clone()
            h = _per_example(halve)
            step = torch.where(h, step / 2.0, step)
            x_adv = torch.where(h, x_best, x_adv)
            grad = torch.where(h, grad_best, grad)
            interval, since_check = max(interval - s.interval_decrease, s.min_interval), 0
    return robust, x_best_adv


# ---------------------------------------------------------------- the attacks on merged reference batches

def _start_noise(x: Tensor, idx: Tensor, layout: ReferenceBatches, s: ApgdSettings) -> Tensor:
    noise = layout.draw(layout.counts(idx), x.shape[1:], normal=s.norm == "L2")
    return noise.to(x.device)


def _attack_still_robust(calls: ModelCalls, x: Tensor, y: Tensor, robust: Tensor, x_out: Tensor,
                         layout: ReferenceBatches, s: ApgdSettings,
                         loss_for: Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]],
                         check_zero: bool = False) -> bool:
    """One APGD run (one restart) on the points still robust, updating ``robust`` and ``x_out`` with the
    confirmed successes; False when no point was left to attack. ``loss_for(xs, ys)`` builds the loss."""
    idx = robust.nonzero().squeeze(1)
    if idx.numel() == 0:
        return False
    xs, ys = x[idx], y[idx]
    loss = loss_for(xs, ys)
    start = random_start(xs, _start_noise(x, idx, layout, s), s)
    still, adv = run(calls, xs, ys, loss, start, s, check_zero)
    fooled = calls.confirm(adv, ys, ~still)
    robust[idx[fooled]] = False
    x_out[idx[fooled]] = adv[fooled]
    return True


def untargeted(calls: ModelCalls, x: Tensor, y: Tensor, layout: ReferenceBatches, s: ApgdSettings,
               loss: str = "ce") -> Tensor:
    """APGD-CE / APGD-DLR on every reference batch of the merged ``x`` (the reference's ``perturb``)."""
    make_loss = {"ce": ce_loss, "dlr": dlr_loss}[loss]
    x_out = x.clone()
    robust = calls.logits(x).max(1)[1] == y
    for _ in range(s.n_restarts):
        if not _attack_still_robust(calls, x, y, robust, x_out, layout, s, lambda xs, ys: make_loss(ys),
                                    check_zero=loss == "dlr"):
            break
    return x_out


def targeted(calls: ModelCalls, x: Tensor, y: Tensor, layout: ReferenceBatches, s: ApgdSettings) -> Tensor:
    """APGD-T: targeted DLR towards the 2nd, 3rd, ... most likely class in turn, on the points still robust."""
    x_out = x.clone()
    robust = calls.logits(x).max(1)[1] == y
    for rank in range(2, s.n_target_classes + 2):

        def towards_rank(xs: Tensor, ys: Tensor, rank: int = rank) -> Callable[[Tensor], Tensor]:
            return targeted_dlr_loss(ys, calls.logits(xs).sort(dim=1)[1][:, -rank])

        for _ in range(s.n_restarts):
            if not _attack_still_robust(calls, x, y, robust, x_out, layout, s, towards_rank, check_zero=True):
                return x_out
    return x_out
