"""Square Attack (Andriushchenko et al., ECCV 2020), margin loss, Linf and L2, as pyautoattack runs it.

The reference draws some random numbers once per BATCH per iteration: the square's position (shared by all
alive points of the batch), the Linf colour of the square, the L2 pattern's orientation; and, for L2, one
sign per alive point and channel. So in merged-batch mode every reference batch has its own stream (see
``_batches.UniformStream``) and its own square position; the device work stays one batch: positions
become per-point masks and gathers. The number each batch draws depends on how many of ITS points are
still alive, which the loop knows because it re-gathers the alive points (like the reference) — every
iteration for L2, every ``compact_every`` iterations for Linf, whose draws do not depend on that number.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._batches import ModelCalls, ReferenceBatches, UniformStream


def unsupported(attack) -> str | None:
    """Why a pyautoattack SquareAttack's configuration cannot run here (None when it can)."""
    if attack.norm not in ("Linf", "L2"):
        return f"Square with norm {attack.norm} is not implemented natively"
    if attack.targeted or attack.loss != "margin":
        return "only the untargeted margin-loss Square Attack is implemented natively"
    if attack.n_restarts != 1:
        return "Square with restarts is not implemented natively"
    return None


@dataclass(frozen=True)
class SquareSettings:
    norm: str
    eps: float
    n_queries: int = 5000
    p_init: float = 0.8
    rescale_schedule: bool = False

    @classmethod
    def from_reference(cls, attack) -> "SquareSettings":
        return cls(norm=attack.norm, eps=float(attack.eps), n_queries=int(attack.n_queries),
                   p_init=float(attack.p_init), rescale_schedule=bool(attack.rescale_schedule))

    def fraction(self, it: int) -> float:
        """Share of the image the square covers at iteration ``it`` (halved at fixed iterations)."""
        if self.rescale_schedule:
            it = int(it / self.n_queries * 10000)
        for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                               (6000, 128), (8000, 256)):
            if it <= bound:
                return self.p_init / divisor
        return self.p_init / 512

    def side(self, it: int, c: int, h: int, w: int) -> int:
        """Side of the square in pixels; L2 uses odd sides of at least 3."""
        n_features = c * h * w
        root = int(round(math.sqrt(self.fraction(it) * n_features / c)))
        if self.norm == "Linf":
            return min(max(root, 1), min(h, w))
        side = max(root, 3)
        side += side % 2 == 0
        return min(side, min(h, w))


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """True-class logit minus the best other logit (negative = misclassified)."""
    rows = torch.arange(y.shape[0], device=y.device)
    true = logits[rows, y].clone()
    others = logits.clone()
    others[rows, y] = -float("inf")
    return true - others.max(dim=-1)[0]


def _signs(u: Tensor) -> Tensor:
    """The reference's random ±1 (0 when u is exactly 1/2) from uniform numbers."""
    return torch.sign(2 * u - 1)


def _positions(u: Tensor, span: Tensor | int) -> Tensor:
    """The reference's random integer in [0, span) from a uniform number."""
    return (span * u).long()


# ---------------------------------------------------------------- L2 square pattern

def _rings(rows: int, cols: int, device: torch.device) -> Tensor:
    """Nested rectangles around the centre, ring k weighted 1/(k+1)^2, unit L2 norm."""
    pattern = torch.zeros(rows, cols, device=device)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        weight = 1.0 / (torch.tensor([[float(k + 1)]], device=device) ** 2)
        pattern[max(top, 0):min(top + 2 * k + 1, rows), max(0, left):min(left + 2 * k + 1, cols)] += weight
        top, left = top - 1, left - 1
    return pattern / (pattern ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


@functools.lru_cache(maxsize=64)
def l2_pattern(side: int, device: torch.device) -> Tensor:
    """Upper half positive rings, lower half negative rings, unit L2 norm (before the random transpose)."""
    pattern = torch.zeros(side, side, device=device)
    pattern[:side // 2] = _rings(side // 2, side, device)
    pattern[side // 2:] = -1. * _rings(side - side // 2, side, device)
    return pattern / (pattern ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def _unit_l2(v: Tensor) -> Tensor:
    return v / ((v ** 2).reshape(v.shape[0], -1).sum(-1).sqrt().view(-1, 1, 1, 1) + 1e-12)


def _window_index(top: Tensor, left: Tensor, side: int, width: int, channels: int) -> Tensor:
    """Flat (h*w) indices of each point's side x side window, shaped (n, channels, side*side) for gather."""
    r = torch.arange(side, device=top.device)
    flat = (top.view(-1, 1, 1) + r.view(1, -1, 1)) * width + (left.view(-1, 1, 1) + r.view(1, 1, -1))
    return flat.view(-1, 1, side * side).expand(-1, channels, -1)


def _window_mask(top: Tensor, left: Tensor, side: int, h: int, w: int) -> Tensor:
    """(n, 1, h, w) True inside each point's window."""
    rows = torch.arange(h, device=top.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, 1, w)
    top, left = top.view(-1, 1, 1, 1), left.view(-1, 1, 1, 1)
    return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)


# ---------------------------------------------------------------- the attack on merged reference batches

class _Search:
    """State shared by both norms: the points under attack, their batch, their batch's random stream."""

    def __init__(self, calls: ModelCalls, x: Tensor, y: Tensor, owner: Tensor, counts: list[int],
                 streams: list[UniformStream], s: SquareSettings):
        self.calls, self.x, self.y, self.owner, self.counts, self.streams, self.s = \
            calls, x, y, owner, counts, streams, s
        self.device = x.device

    def _per_batch_uniform(self, per_point: int) -> Tensor:
        """``per_point`` numbers per attacked point, drawn batch by batch (the reference's order), on device."""
        parts = [st.take(k * per_point).view(k, per_point) for st, k in zip(self.streams, self.counts) if k]
        return torch.cat(parts).to(self.device)

    def _alive(self) -> Tensor | slice | None:
        """The points still to fool (margin > 0): None if none, a plain slice (no copies) if all of them."""
        active = (self.margin > 0.0).nonzero().squeeze(1)
        if active.numel() == 0:
            return None
        return slice(None) if active.numel() == self.margin.numel() else active

    def _accept(self, active: Tensor | slice, x_new: Tensor, margin_new: Tensor) -> None:
        """The reference's bookkeeping: keep lower losses, and any misclassifying query."""
        alive = self.margin[active] > 0.0
        lm, mm = self.loss[active], self.margin[active]
        better = (margin_new < lm) & alive
        self.loss[active] = torch.where(better, margin_new, lm)
        better = (better | (margin_new <= 0.)) & alive
        self.margin[active] = torch.where(better, margin_new, mm)
        if x_new.device.type != "cpu":   # no host synchronisation per query on a GPU
            self.x_best[active] = torch.where(better.view(-1, 1, 1, 1), x_new, self.x_best[active])
            return
        # on a CPU only the improved rows are written (the others would be written back unchanged)
        rows = better.nonzero().squeeze(1)
        if rows.numel():
            self.x_best[rows if isinstance(active, slice) else active[rows]] = x_new[rows]

    def _start(self, x_best: Tensor) -> None:
        self.x_best = x_best
        self.margin = margins(self.calls.logits(x_best), self.y)
        self.loss = self.margin.clone()


class _LinfSearch(_Search):
    def run(self, compact_every: int) -> Tensor:
        s, x = self.s, self.x
        n, c, h, w = x.shape
        stripes = self._per_batch_uniform(c * w).view(n, c, 1, w)
        self._start(torch.clamp(x + s.eps * _signs(stripes), 0., 1.))

        # every iteration draws 2 + c numbers per batch: row, column, colour per channel
        q = s.n_queries
        sides = [s.side(i, c, h, w) for i in range(q)]
        batch_draws = [st.take(q * (2 + c)).view(q, 2 + c) if k else torch.zeros(q, 2 + c)
                       for st, k in zip(self.streams, self.counts)]
        draws = torch.stack(batch_draws)                                       # (B, q, 2 + c)
        room = torch.tensor([[h - side for side in sides]], dtype=torch.float32)
        tops = _positions(draws[:, :, 0], room).to(self.device)
        lefts = _positions(draws[:, :, 1], torch.tensor([[w - side for side in sides]], dtype=torch.float32))
        lefts = lefts.to(self.device)
        colours = _signs(draws[:, :, 2:]).to(self.device)

        # Only the square changes: x_best is already inside the eps ball and [0, 1], so clamping it again is
        # the identity outside the window; the window gets the reference's arithmetic, element for element.
        lo, hi = (x - s.eps).reshape(n, c, h * w), (x + s.eps).reshape(n, c, h * w)
        active: Tensor | slice = slice(None)
        for i in range(q):
            if i % compact_every == 0:
                active = self._alive()
                if active is None:
                    break
            b = self.owner[active]
            x_new = self.x_best[active]
            x_new = x_new.clone() if isinstance(active, slice) else x_new
            na = x_new.shape[0]
            spots = _window_index(tops[b, i], lefts[b, i], sides[i], w, c)
            flat = x_new.view(na, c, h * w)
            bump = (2. * s.eps) * colours[b, i].view(-1, c, 1)
            window = flat.gather(2, spots) + bump
            window = torch.min(torch.max(window, lo[active].gather(2, spots)), hi[active].gather(2, spots))
            flat.scatter_(2, spots, torch.clamp(window, 0., 1.))
            self._accept(active, x_new, margins(self.calls.logits(x_new), self.y[active]))
        return self.x_best


class _L2Search(_Search):
    def _draw(self, counts: list[int], per_batch: int) -> tuple[Tensor, Tensor]:
        """Per batch ``per_batch`` numbers (positions, orientation), then a sign per alive point and channel.

        Returns the batch numbers repeated for each of its alive points (CPU) and the signs (device).
        """
        c = self.x.shape[1]
        heads, signs = [], []
        for st, k in zip(self.streams, counts):
            if k:
                heads.append(st.take(per_batch).expand(k, per_batch))
                signs.append(st.take(k * c))
        return torch.cat(heads), _signs(torch.cat(signs)).view(-1, c, 1, 1).to(self.device)

    def _l2_start(self) -> Tensor:
        """Grid of 5 x 5 L2 patterns with a random sign per channel, rescaled to norm eps."""
        x, s = self.x, self.s
        n, c, h, w = x.shape
        side = h // 5
        first = (h - side * 5) // 2
        delta = torch.zeros_like(x)
        for top in range(first, first + side * (h // side), side):
            for left in range(first, first + side * (w // side), side):
                flip, signs = self._draw(self.counts, 1)
                pattern = self._oriented(side, flip[:, 0] > 0.5)
                delta[:, :, top:top + side, left:left + side] += pattern.view(n, 1, side, side) * signs
        return torch.clamp(x + _unit_l2(delta) * s.eps, 0., 1.)

    def _oriented(self, side: int, transpose: Tensor) -> Tensor:
        """Each point's pattern, transposed where its batch drew > 1/2; (n, side, side)."""
        base = l2_pattern(side, self.device)
        return torch.where(transpose.to(self.device).view(-1, 1, 1), base.t(), base)

    def run(self, compact_every: int) -> Tensor:
        s, x = self.s, self.x
        n, c, h, w = x.shape
        self._start(self._l2_start())
        eps_sq = torch.tensor(s.eps, dtype=torch.float32, device=self.device) ** 2
        for i in range(s.n_queries):
            active = self._alive()
            if active is None:
                break
            side = s.side(i, c, h, w)
            alive_counts = torch.bincount(self.owner[active], minlength=len(self.streams)).tolist()
            # per batch: row, column, second row, second column, orientation; then the signs
            heads, sign = self._draw(alive_counts, 5)
            room = torch.tensor([h - side, w - side, h - side, w - side], dtype=torch.float32)
            pos = _positions(heads[:, :4], room).to(self.device)
            transpose = heads[:, 4] > 0.5

            xa = x[active]
            x_best = self.x_best[active]
            delta = x_best - xa
            na = xa.shape[0]
            idx1 = _window_index(pos[:, 0], pos[:, 1], side, w, c)
            idx2 = _window_index(pos[:, 2], pos[:, 3], side, w, c)
            flat = delta.reshape(na, c, h * w)
            window = flat.gather(2, idx1).view(na, c, side, side)
            window_norm = (window ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
            image_norm = (delta ** 2).reshape(na, -1).sum(-1).sqrt().view(-1, 1, 1, 1)
            both = (_window_mask(pos[:, 0], pos[:, 1], side, h, w) | _window_mask(pos[:, 2], pos[:, 3], side, h, w))
            windows_norm = ((delta * both.float()) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()

            # contiguous like the reference's buffer, so the sums below add in the same order
            fresh = torch.ones(na, c, side, side, device=self.device)
            fresh *= self._oriented(side, transpose).view(na, 1, side, side) * sign
            fresh += window / (1e-12 + window_norm)
            budget = (torch.clamp(eps_sq - image_norm ** 2, min=0.) / c + windows_norm ** 2).sqrt()
            fresh = fresh / (1e-12 + (fresh ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * budget
            flat.scatter_(2, idx2, 0.)
            flat.scatter_(2, idx1, fresh.reshape(na, c, side * side))

            x_new = torch.clamp(xa + _unit_l2(delta) * s.eps, 0., 1.)
            self._accept(active, x_new, margins(self.calls.logits(x_new), self.y[active]))
        return self.x_best


def attack(calls: ModelCalls, x: Tensor, y: Tensor, layout: ReferenceBatches, s: SquareSettings,
           compact_every: int = 1) -> Tensor:
    """Square on every reference batch of the merged ``x`` (the reference's ``perturb``, one restart)."""
    x_out = x.clone()
    robust = calls.logits(x).max(1)[1] == y
    idx = robust.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_out
    search_cls = _LinfSearch if s.norm == "Linf" else _L2Search
    streams = [UniformStream(g) for g in layout.generators]
    search = search_cls(calls, x[idx], y[idx], layout.batch_of[idx], layout.counts(idx), streams, s)
    x_best = search.run(max(1, int(compact_every)))
    fooled = calls.logits_fp32(x_best).max(1)[1] != y[idx]
    x_out[idx[fooled]] = x_best[fooled]
    return x_out
