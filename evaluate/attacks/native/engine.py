"""The native engine: pyautoattack's attacks re-implemented so that results are the same, only faster.

Where the speed comes from:

- **Merged-batch mode.** The runner cuts the robust points into the reference's batches of B and the
  reference runs each batch on its own, reseeding the CPU generator first. Everything APGD, Square and FAB
  keep is per example (step sizes, best points, margins, projections), so several reference batches can run
  as ONE device batch provided each batch still gets exactly the random numbers it would have drawn: every
  reference batch owns a ``torch.Generator`` seeded like the reference, and draws from it in the reference's
  order and amounts (which depend on how many of *that batch's* points are still alive).
- No host synchronisation inside the APGD iterations (masks instead of ``nonzero``), gradients for the
  input only (parameters frozen while attacking), and FAB-T's target classes run side by side.

Attack settings (iterations, restarts, target classes, queries, ...) are read from a
``pyautoattack.AutoAttack`` built with the same arguments (through :class:`ReferenceEngine`), so the two
cannot drift apart; attacks or settings this module does not implement are run by that reference object
and listed in ``delegated_attacks``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

import zoo
from zoo.domain import NORMS
from zoo.errors import BadInputError

from ... import devices
from ..engine import KNOWN_ATTACKS, Engine
from ..reference import ReferenceEngine
from . import apgd as native_apgd
from . import fab as native_fab
from . import square as native_square
from ._batches import ModelCalls, ReferenceBatches, frozen_parameters

ENGINE_VERSION = f"{zoo.__version__}+native1"


# ---------------------------------------------------------------- the engine

@dataclass(frozen=True)
class NativeOptions:
    """Knobs that change speed or memory, never results (beyond floating-point rounding of batch shapes).

    max_device_batch: merged batches are cut (at reference-batch boundaries) so no device batch exceeds
        this many points; None = no limit.
    square_compact_every: Square re-gathers its still-alive points every this many iterations (1 = every
        iteration, like the reference); between compactions finished points ride along masked, which saves
        a host synchronisation per iteration on a GPU.
    fab_target_group: how many FAB-T target classes run side by side; None = one at a time on a CPU (like
        the reference), on a GPU as many as keep the device batch within ``fab_max_points``.
    fab_max_points: the device-batch size FAB-T aims for when it groups target classes automatically
        (never more than ``max_device_batch``, which also bounds an explicit ``fab_target_group``).
    """

    max_device_batch: int | None = None
    square_compact_every: int | None = None
    fab_target_group: int | None = None
    fab_max_points: int = 1024


class NativeEngine(Engine):
    """Same interface as :class:`ReferenceEngine`; merges reference batches and runs its own bf16 autocast."""

    name = "native"
    autocast_aware = True
    merges_batches = True
    version = ENGINE_VERSION

    def __init__(self, model: nn.Module, *, norm: str, eps: float, seed: int, version: str = "standard",
                 device: torch.device | str | None = None, precision: str = "fp32",
                 attacks: Sequence[str] | None = None, options: NativeOptions | None = None,
                 max_device_batch: int | None = None):
        if precision not in ("fp32", "bf16"):   # autocast precisions; make_engine maps tf32 to fp32
            raise ValueError(f"NativeEngine precision must be 'fp32' or 'bf16', got {precision!r}")
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model
        self.seed = int(seed)
        self.precision = precision
        self.options = options or NativeOptions()
        if max_device_batch is not None:  # the runner's GPU memory probe caps merged batches
            self.options = dataclasses.replace(self.options, max_device_batch=max_device_batch)
        norm = NORMS.get(norm, norm)  # accept the threat spelling (linf) as well as AutoAttack's (Linf)
        self.reference = ReferenceEngine(model, norm=norm, eps=eps, version=version, attacks=attacks,
                                         seed=self.seed, device=self.device)
        self.autoattack = self.reference.autoattack
        self.norm = self.autoattack.norm
        self.eps = float(eps)
        self.attacks = self.reference.attacks
        self.counters: dict[str, dict[str, int]] = {}
        self.zero_gradient_points = 0
        self.delegated_attacks: dict[str, str] = {}
        for attack in KNOWN_ATTACKS:
            reason = self._why_not_native(attack)
            if reason is not None:
                self.delegated_attacks[attack] = reason
        if precision != "fp32" and any(a in self.delegated_attacks for a in self.attacks):
            bad = ", ".join(a for a in self.attacks if a in self.delegated_attacks)
            raise BadInputError(f"precision {precision!r} needs native attacks, but {bad} would run in "
                                "pyautoattack (fp32 only)", hint="use precision fp32 for this configuration")

    # ---- what runs natively

    def _why_not_native(self, attack: str) -> str | None:
        aa = self.autoattack
        if self.norm not in ("Linf", "L2"):
            return f"norm {self.norm} is not implemented natively"
        if attack in ("apgd-ce", "apgd-dlr", "apgd-t"):
            return native_apgd.unsupported(aa.apgd_targeted if attack == "apgd-t" else aa.apgd)
        if attack == "square":
            return native_square.unsupported(aa.square)
        if attack in ("fab", "fab-t"):
            return native_fab.unsupported(aa.fab)
        return f"unknown attack {attack!r}"

    # ---- running

    def attack_batch(self, attack: str, x: Tensor, y: Tensor) -> Tensor:
        return self.attack_batches(attack, [(x, y)])[0]

    def attack_batches(self, attack: str, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """x_adv for each reference batch, as if the reference attack ran on each batch on its own."""
        if attack not in KNOWN_ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(KNOWN_ATTACKS)}")
        counts = self.counters.setdefault(attack, {"forward": 0, "backward": 0, "fp32_check": 0})
        if attack in self.delegated_attacks:
            return [self._run_reference(attack, x, y, counts) for x, y in batches]
        out: list[Tensor] = []
        for group in self._groups([int(x.shape[0]) for x, _ in batches]):
            xs = torch.cat([batches[i][0] for i in group]).to(self.device).float().contiguous()
            ys = torch.cat([batches[i][1] for i in group]).to(self.device).long()
            layout = ReferenceBatches([batches[i][0].shape[0] for i in group], self.seed, self.device)
            calls = ModelCalls(self.model, self.precision)
            with frozen_parameters(self.model):
                x_adv = self._run_native(attack, calls, xs, ys, layout)
            for key, value in calls.counts.items():
                counts[key] += value
            self.zero_gradient_points += calls.zero_gradient_points()
            out.extend(x_adv.split(layout.sizes))
        return out

    def _groups(self, sizes: list[int]) -> list[list[int]]:
        """Consecutive reference batches whose total stays within ``max_device_batch``."""
        cap = self.options.max_device_batch
        groups: list[list[int]] = []
        total = 0
        for i, size in enumerate(sizes):
            if not groups or (cap is not None and total + size > cap):
                groups.append([])
                total = 0
            groups[-1].append(i)
            total += size
        return groups

    def _run_native(self, attack: str, calls: ModelCalls, x: Tensor, y: Tensor, layout: ReferenceBatches) -> Tensor:
        self.reference.configured(attack)  # keep the reference objects' state in step (e.g. fab.n_restarts)
        aa = self.autoattack
        if attack in ("apgd-ce", "apgd-dlr"):
            settings = native_apgd.ApgdSettings.from_reference(aa.apgd)
            return native_apgd.untargeted(calls, x, y, layout, settings, loss="ce" if attack == "apgd-ce" else "dlr")
        if attack == "apgd-t":
            return native_apgd.targeted(calls, x, y, layout, native_apgd.ApgdSettings.from_reference(aa.apgd_targeted))
        if attack == "square":
            settings = native_square.SquareSettings.from_reference(aa.square)
            every = self.options.square_compact_every or (8 if devices.is_gpu(self.device) else 1)
            return native_square.attack(calls, x, y, layout, settings, compact_every=every)
        settings = native_fab.FabSettings.from_reference(aa.fab, targeted=attack == "fab-t")
        group, max_points, cap = self._fab_grouping()
        return native_fab.attack(calls, x, y, layout, settings, target_group=group, max_points=max_points,
                                 point_cap=cap)

    def _fab_grouping(self) -> tuple[int | None, int, int | None]:
        """(target group, points FAB-T aims for, hard cap): side-by-side targets never exceed the memory cap.

        Without this, FAB-T's target groups (up to ``fab_max_points`` points) would ignore the runner's
        ``max_device_batch`` and be the likeliest out-of-memory on a large model.
        """
        group = self.options.fab_target_group or (None if devices.is_gpu(self.device) else 1)
        cap = self.options.max_device_batch
        max_points = self.options.fab_max_points if cap is None else min(self.options.fab_max_points, cap)
        return group, max_points, cap

    def _run_reference(self, attack: str, x: Tensor, y: Tensor, counts: dict[str, int]) -> Tensor:
        """pyautoattack itself on one batch (for what is delegated), counting its model calls."""
        model = self.autoattack.model
        seen = {"forward": 0, "backward": 0}

        def count_forward(module, inputs, output):
            seen["forward"] += inputs[0].shape[0]
            if output.requires_grad:
                output.register_hook(lambda g: seen.__setitem__("backward", seen["backward"] + g.shape[0]))

        handle = model.register_forward_hook(count_forward)
        try:
            with frozen_parameters(model):
                x_adv = self.reference.attack_batch(attack, x.to(self.device).contiguous(), y.to(self.device))
        finally:
            handle.remove()
        counts["forward"] += seen["forward"]
        counts["backward"] += seen["backward"]
        return x_adv

    # ---- the rest of the Engine protocol is the reference's

    attacks_for = staticmethod(ReferenceEngine.attacks_for)

    def replay(self, done: Sequence[str]) -> None:
        self.reference.replay(done)

    def cost_per_point(self, attack: str, num_classes: int) -> tuple[int, int]:
        return self.reference.cost_per_point(attack, num_classes)

    def take_zero_gradients(self) -> int:
        """Native APGD's count plus the reference's for delegated attacks."""
        points, self.zero_gradient_points = self.zero_gradient_points, 0
        return points + self.reference.take_zero_gradients()
