"""pyautoattack's own attack objects as an engine: the reference every other engine is checked against."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import pyautoattack
import torch
from pyautoattack import autopgd_base
from torch import nn

from .engine import KNOWN_ATTACKS, Engine, zero_gradient_points


class ReferenceEngine(Engine):
    """pyautoattack's own attack objects, configured per batch exactly as its evaluation loop does."""

    name = "reference"
    version = pyautoattack.__version__

    def __init__(self, model: nn.Module, *, norm: str, eps: float, version: str, attacks: Sequence[str] | None,
                 seed: int, device: torch.device | str):
        self.seed = int(seed)
        self.autoattack = pyautoattack.AutoAttack(model, attacks=list(attacks) if version == "custom" else None,
                                           device=device, eps=eps, norm=norm, seed=self.seed, version=version)
        self.attacks = tuple(self.autoattack.attacks_to_run)
        self.zero_gradient_points = 0

    @contextlib.contextmanager
    def _counting_zero_gradients(self) -> Iterator[None]:
        """pyautoattack's APGD hands its initial gradient to ``check_zero_gradients``, which only logs; while
        attacking, that name in ``autopgd_base`` points at a wrapper that counts the points, then logs as before."""
        original = autopgd_base.check_zero_gradients

        def counting(grad, logger=None):
            self.zero_gradient_points += int(zero_gradient_points(grad))
            return original(grad, logger=logger)

        autopgd_base.check_zero_gradients = counting
        try:
            yield
        finally:
            autopgd_base.check_zero_gradients = original

    def take_zero_gradients(self) -> int:
        points, self.zero_gradient_points = self.zero_gradient_points, 0
        return points

    @staticmethod
    def attacks_for(version: str, norm: str) -> list[str]:
        """The attack sequence pyautoattack runs for ``version`` (read from pyautoattack, not copied)."""
        if version == "custom":
            raise ValueError("version 'custom' has no fixed attack list")
        aa = pyautoattack.AutoAttack(nn.Identity(), eps=1.0, norm=norm, seed=0, version=version)
        return list(aa.attacks_to_run)

    def configured(self, attack: str):
        """The reference loop's per-batch set-up for ``attack``; returns the object whose perturb runs it."""
        aa, seed = self.autoattack, self.autoattack.get_seed()
        if attack in ("apgd-ce", "apgd-dlr"):
            aa.apgd.loss = "ce" if attack == "apgd-ce" else "dlr"
            aa.apgd.seed = seed
            return aa.apgd
        if attack == "apgd-t":
            aa.apgd_targeted.seed = seed
            return aa.apgd_targeted
        if attack == "fab":
            aa.fab.targeted = False
            aa.fab.seed = seed
            return aa.fab
        if attack == "fab-t":
            aa.fab.targeted = True
            aa.fab.n_restarts = 1
            aa.fab.seed = seed
            return aa.fab
        if attack == "square":
            aa.square.seed = seed
            return aa.square
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(KNOWN_ATTACKS)}")

    def attack_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._counting_zero_gradients():
            return self.configured(attack).perturb(x, y)

    def replay(self, done: Sequence[str]) -> None:
        for attack in done:
            self.configured(attack)

    def cost_per_point(self, attack: str, num_classes: int) -> tuple[int, int]:
        aa = self.autoattack
        if attack in ("apgd-ce", "apgd-dlr", "apgd-t"):
            a = aa.apgd_targeted if attack == "apgd-t" else aa.apgd
            steps = a.n_iter + (3 if a.use_largereps else 1)  # L1 runs three eps phases, +1 start each
            per_run = a.eot_iter * steps
            if attack == "apgd-t":
                runs = a.n_target_classes * a.n_restarts
                return 1 + runs * (1 + per_run), runs * per_run
            return 1 + a.n_restarts * per_run, a.n_restarts * per_run
        if attack in ("fab", "fab-t"):
            f = aa.fab
            targeted = attack == "fab-t"
            restarts = 1 if targeted else f.n_restarts
            runs = restarts * (f.n_target_classes if targeted else 1)
            grads = 1 if targeted else num_classes
            return 1 + runs * (2 + 2 * f.n_iter), runs * f.n_iter * grads
        if attack == "square":
            s = aa.square
            return 2 + s.n_restarts * s.n_queries, 0
        raise ValueError(f"unknown attack {attack!r}")
