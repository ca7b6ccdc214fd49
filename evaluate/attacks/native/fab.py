"""FAB and FAB-T (Croce & Hein, ICML 2020), Linf and L2, as pyautoattack runs them.

Same iterations and arithmetic as ``pyautoattack.fab_base`` / ``fab_pt`` / ``fab_projections``: linearise
the decision boundary at the current point, project both the current point and the original onto that
hyperplane (within [0, 1]), move to a convex combination of the two projections (overshoot ``eta``, weight
at most ``alpha_max``), and after every adversarial iterate step back towards the original by ``beta``;
the result is the smallest adversarial iterate, accepted when it is within eps.

Everything is per example, so merged reference batches need nothing special, and FAB-T's target classes —
which the reference runs one after another on the points still robust — can run side by side: a point's
run towards target k does not depend on any other run, so taking, for each point, the first target that
succeeded gives the reference's answer (at the price of also finishing the later targets of a point that
an earlier one fooled; the group size bounds that). The standard version's FAB-T draws no random numbers;
untargeted FAB's restarts draw their random starts per reference batch like APGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batches import ModelCalls, ReferenceBatches


NOT_FOUND = 1e10   # the reference's "no adversarial iterate yet" distance


def unsupported(attack) -> str | None:
    """Why a pyautoattack FABAttack's configuration cannot run here (None when it can)."""
    if attack.norm not in ("Linf", "L2"):
        return f"FAB with norm {attack.norm} is not implemented natively"
    return None


@dataclass(frozen=True)
class FabSettings:
    norm: str
    eps: float
    targeted: bool
    n_iter: int = 100
    n_restarts: int = 1
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    @classmethod
    def from_reference(cls, attack, targeted: bool) -> "FabSettings":
        return cls(norm=attack.norm, eps=float(attack.eps), targeted=targeted, n_iter=int(attack.n_iter),
                   n_restarts=1 if targeted else int(attack.n_restarts),
                   n_target_classes=int(attack.n_target_classes), alpha_max=float(attack.alpha_max),
                   eta=float(attack.eta), beta=float(attack.beta))


def _rows_norm(v: Tensor, norm: str) -> Tensor:
    flat = v.reshape(v.shape[0], -1)
    return flat.abs().max(dim=1)[0] if norm == "Linf" else (flat ** 2).sum(dim=-1).sqrt()


# ---------------------------------------------------------------- projections onto {z: <w, z> = b} ∩ [0, 1]^d

def _bisect(lower_is_ok, n_cols: int, rows: int, device) -> Tensor:
    """Per-row binary search over column positions, the reference's bounds and rounding."""
    lb = torch.zeros(rows, device=device)
    ub = torch.full_like(lb, n_cols - 1)
    for _ in range(math.ceil(math.log2(n_cols))):
        mid = torch.floor((lb + ub) / 2)
        ok = lower_is_ok(mid.long().unsqueeze(1))
        lb = torch.where(ok, mid, lb)
        ub = torch.where(ok, ub, mid)
    return lb.long()


def _argsort_nonnegative(p: Tensor) -> Tensor:
    """``torch.argsort(p, dim=1)`` for ``p >= +0``, the same permutation, about 10% faster on a CPU.

    On a CPU ``argsort`` is ``std::sort`` (not stable: the order of equal values is the algorithm's own, and
    the projection's rows are full of them, so it cannot be replaced by any other sort). For non-negative
    floats other than -0.0 the float32 bit patterns read as int32 compare exactly like the values, so
    ``std::sort`` makes the same comparisons and returns the same permutation on the int32 view, with
    cheaper comparisons. Anything else goes to ``argsort`` on the floats.
    """
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return torch.argsort(p, dim=1)
    bits = p.contiguous().view(torch.int32)
    if bool(((bits < 0) | (bits > 0x7F800000)).any()):   # negative, -0.0 or NaN: bits do not order like values
        return torch.argsort(p, dim=1)
    return torch.argsort(bits, dim=1)


def project_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Smallest-Linf step d with <w, t + d> = b and t + d in [0, 1] (rows independent)."""
    sign = torch.where((w * t).sum(1) - b >= 0, 1.0, -1.0)
    w = w * sign.unsqueeze(1)
    b = b * sign
    a = (w < 0).float()
    active = (w != 0).float()
    d = (a - t) * active
    p = a - t * (2 * a - 1)
    order = _argsort_nonnegative(p)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    rev = order.flip((1,))
    ws = w.gather(1, rev)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(-ws * d.gather(1, rev), dim=1) + b0.unsqueeze(1)

    b2 = sb[:, -1] - s[:, -1] * p.gather(1, order[:, 0:1]).squeeze(1)
    whole = b - b2 > 0
    partial = (b - b0 > 0) & ~whole
    n_cols = w.shape[1]

    def ok(mid: Tensor) -> Tensor:
        at = order.gather(1, n_cols - 1 - mid)
        return b - (sb.gather(1, mid) - s.gather(1, mid) * p.gather(1, at)).squeeze(1) > 0

    lb = _bisect(ok, n_cols, w.shape[0], w.device).unsqueeze(1)
    lam_whole = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), min=0).unsqueeze(-1)
    lam = torch.clamp_min((b - sb.gather(1, lb).squeeze(1)) / (-s.gather(1, lb).squeeze(1)), min=0).unsqueeze(-1)
    d_whole = (2 * a - 1) * lam_whole
    d_partial = torch.min(lam, d) * a + torch.max(-lam, d) * (1 - a)
    d = torch.where(whole.unsqueeze(1), d_whole, torch.where(partial.unsqueeze(1), d_partial, d))
    return d * active


def project_l2(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Smallest-L2 step d with <w, t + d> = b and t + d in [0, 1] (rows independent)."""
    c = (w * t).sum(1) - b
    sign = torch.where(c >= 0, 1.0, -1.0)
    w = w * sign.unsqueeze(1)
    c = c * sign
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, order = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)
    w3s = (w ** 2).gather(1, order)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).float())
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)

    beyond = s[:, 0] + c < 0
    inside = (d * w).sum(dim=1) + c > 0
    partial = ~(beyond | inside)
    lb = _bisect(lambda mid: s.gather(1, mid).squeeze(1) + c > 0, w.shape[1], w.shape[0], w.device).unsqueeze(1)

    alpha_beyond = c / w5.squeeze(-1)
    d_beyond = -alpha_beyond.unsqueeze(-1) * w
    ws_lb = ws.gather(1, lb).squeeze(1)
    alpha = (s.gather(1, lb).squeeze(1) + c) / ws_lb + rs.gather(1, lb).squeeze(1)
    alpha = torch.where(ws_lb == 0, 0., alpha)
    past = (alpha.unsqueeze(-1) > r).float()
    d_partial = d * past - alpha.unsqueeze(-1) * w * (1 - past)
    d = torch.where(beyond.unsqueeze(1), d_beyond, torch.where(partial.unsqueeze(1), d_partial, d))
    return d * (w.abs() > 1e-8).float()


# ---------------------------------------------------------------- one FAB run on a set of points

def _boundary(calls: ModelCalls, x1: Tensor, y: Tensor, target: Tensor | None, norm: str) -> tuple[Tensor, Tensor]:
    """(f, grad f) of the linearised boundary to cross: towards ``target``, or the closest other class."""
    rows = torch.arange(y.shape[0], device=y.device)
    if target is not None:
        _, diff, grad = calls.loss_and_grad(x1, lambda out: -(out[rows, y] - out[rows, target]))
        return diff, grad
    logits, jac = calls.logits_and_jacobian(x1)
    df = logits - logits[rows, y].unsqueeze(1)
    dg = jac - jac[rows, y].unsqueeze(1)
    df[rows, y] = 1e10
    flat = dg.reshape(dg.shape[0], dg.shape[1], -1)
    dual = flat.abs().sum(dim=-1) if norm == "Linf" else (flat ** 2).sum(dim=-1).sqrt()
    closest = (df.abs() / (1e-12 + dual)).min(dim=1)[1]
    return df[rows, closest], dg[rows, closest]


def run(calls: ModelCalls, x: Tensor, y: Tensor, s: FabSettings, target: Tensor | None = None,
        start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One FAB run on every point; returns (found an adversarial iterate, the smallest one found)."""
    n = x.shape[0]
    project = project_linf if s.norm == "Linf" else project_l2
    best = x.clone()
    best_dist = torch.full((n,), NOT_FOUND, device=x.device)
    x1 = x.clone() if start is None else start
    x0 = x.reshape(n, -1)
    for _ in range(s.n_iter):
        with torch.no_grad():
            f, g = _boundary(calls, x1, y, target, s.norm)
            b = -f + (g * x1).reshape(n, -1).sum(dim=-1)
            w = g.reshape(n, -1)
            steps = project(torch.cat((x1.reshape(n, -1), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1, d2 = steps[:n].reshape(x1.shape), steps[-n:].reshape(x1.shape)
            size = steps.abs().max(dim=1, keepdim=True)[0] if s.norm == "Linf" \
                else (steps ** 2).sum(dim=1, keepdim=True).sqrt()
            size = torch.max(size, torch.full_like(size, 1e-8)).view(-1, 1, 1, 1)
            a1, a2 = size[:n], size[-n:]
            alpha = torch.clamp(torch.max(a1 / (a1 + a2), torch.zeros_like(a1)), max=s.alpha_max)
            x1 = ((x1 + s.eta * d1) * (1 - alpha) + (x + d2 * s.eta) * alpha).clamp(0.0, 1.0)

            adversarial = calls.logits(x1).max(1)[1] != y
            dist = _rows_norm(x1 - x, s.norm)
            closer = adversarial & (dist < best_dist)
            best = torch.where(closer.view(-1, 1, 1, 1), x1, best)
            best_dist = torch.where(closer, dist, best_dist)
            x1 = torch.where(adversarial.view(-1, 1, 1, 1), x + (x1 - x) * s.beta, x1)
    return best_dist < NOT_FOUND, best


def _random_start(x: Tensor, noise: Tensor, s: FabSettings) -> Tensor:
    """The reference's restart point: half of eps along uniform (Linf) or Gaussian (L2) noise."""
    radius = torch.full((x.shape[0], 1, 1, 1), s.eps, device=x.device)
    if s.norm == "Linf":
        t = 2 * noise - 1
        scale = t.reshape(t.shape[0], -1).abs().max(dim=1, keepdim=True)[0].reshape(-1, 1, 1, 1)
    else:
        t = noise
        scale = (t ** 2).reshape(t.shape[0], -1).sum(dim=-1).sqrt().view(-1, 1, 1, 1)
    return (x + radius * t / scale * .5).clamp(0.0, 1.0)


def _accepted(calls: ModelCalls, x: Tensor, y: Tensor, found: Tensor, adv: Tensor, s: FabSettings) -> Tensor:
    """The reference's test after a run: misclassified (in fp32) and within eps."""
    candidate = torch.where(found.view(-1, 1, 1, 1), adv, x)
    wrong = calls.logits_fp32(candidate).max(1)[1] != y
    return wrong & ~(_rows_norm(x - candidate, s.norm) > s.eps)


# ---------------------------------------------------------------- the attacks on merged reference batches

def attack(calls: ModelCalls, x: Tensor, y: Tensor, layout: ReferenceBatches, s: FabSettings,
           target_group: int | None = 1, max_points: int = 1024, point_cap: int | None = None) -> Tensor:
    """FAB-T or FAB on every reference batch of the merged ``x`` (the reference's ``perturb``).

    FAB-T runs ``target_group`` target classes side by side; None picks as many as keep about
    ``max_points`` points in a device batch. ``point_cap`` (the runner's GPU memory limit) bounds the
    points of one device batch whatever the group: a group that would exceed it runs fewer targets at once.
    """
    x_out = x.clone()
    robust = calls.logits(x).max(1)[1] == y
    if s.targeted:
        _targeted(calls, x, y, robust, x_out, s, target_group, max_points, point_cap)
    else:
        _untargeted(calls, x, y, layout, robust, x_out, s)
    return x_out


def _attacked(calls: ModelCalls, x: Tensor, y: Tensor, robust: Tensor) -> tuple[Tensor, Tensor | None]:
    """Indices the reference's single run attacks: robust points that its own forward still gets right."""
    idx = robust.nonzero().squeeze(1)
    if idx.numel() == 0:
        return idx, None
    logits = calls.logits(x[idx])
    keep = logits.max(1)[1] == y[idx]
    return idx[keep], logits[keep]


def _targeted(calls, x, y, robust, x_out, s: FabSettings, group: int | None, max_points: int,
              point_cap: int | None) -> None:
    ranks = list(range(2, s.n_target_classes + 2))
    while ranks:
        idx, logits = _attacked(calls, x, y, robust)
        if idx.numel() == 0:
            return
        size = group if group is not None else max_points // idx.numel()
        if point_cap is not None:
            size = min(size, point_cap // idx.numel())
        size = max(1, size)   # one target at a time even when the points alone exceed the cap
        block, ranks = ranks[:size], ranks[size:]
        order = logits.sort(dim=-1)[1]
        k = len(block)
        xs = x[idx].repeat(k, 1, 1, 1)
        ys = y[idx].repeat(k)
        targets = torch.cat([order[:, -rank] for rank in block])
        found, adv = run(calls, xs, ys, s, target=targets)
        success = _accepted(calls, xs, ys, found, adv, s).view(k, -1)
        adv = adv.reshape(k, -1, *x.shape[1:])
        # for each point the first target of the block that fooled it (the reference stops there)
        first_hit = torch.where(success.any(0), success.float().argmax(0), -1)
        hit = (first_hit >= 0).nonzero().squeeze(1)
        x_out[idx[hit]] = adv[first_hit[hit], hit]
        robust[idx[hit]] = False


def _untargeted(calls, x, y, layout: ReferenceBatches, robust, x_out, s: FabSettings) -> None:
    for restart in range(s.n_restarts):
        idx, _ = _attacked(calls, x, y, robust)
        if idx.numel() == 0:
            return
        xs, ys = x[idx], y[idx]
        start = None
        if restart > 0:
            noise = layout.draw(layout.counts(idx), x.shape[1:], normal=s.norm == "L2").to(x.device)
            start = _random_start(xs, noise, s)
        found, adv = run(calls, xs, ys, s, start=start)
        success = _accepted(calls, xs, ys, found, adv, s)
        x_out[idx[success]] = adv[success]
        robust[idx[success]] = False
