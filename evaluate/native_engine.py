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

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

import zoo
from zoo.errors import BadInputError

from .engine import KNOWN_ATTACKS, NORMS, ReferenceEngine

PRECISIONS = ("fp32", "bf16")
ENGINE_VERSION = f"{zoo.__version__}+native1"


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


class NativeEngine:
    """Same interface as :class:`ReferenceEngine`, plus ``attack_batches`` for merged-batch mode."""

    name = "native"
    version = ENGINE_VERSION

    def __init__(self, model: nn.Module, *, norm: str, eps: float, seed: int, version: str = "standard",
                 device: torch.device | str | None = None, precision: str = "fp32",
                 attacks: Sequence[str] | None = None, options: NativeOptions | None = None,
                 max_device_batch: int | None = None):
        if precision not in PRECISIONS:
            raise BadInputError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
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
        from . import native_apgd, native_fab, native_square

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
            raise BadInputError(f"unknown attack {attack!r}", hint=f"use some of {', '.join(KNOWN_ATTACKS)}")
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
        from . import native_apgd, native_fab, native_square

        self.reference.configured(attack)  # keep the reference objects' state in step (e.g. fab.n_restarts)
        aa = self.autoattack
        if attack in ("apgd-ce", "apgd-dlr"):
            settings = native_apgd.ApgdSettings.from_reference(aa.apgd)
            return native_apgd.untargeted(calls, x, y, layout, settings, loss="ce" if attack == "apgd-ce" else "dlr")
        if attack == "apgd-t":
            return native_apgd.targeted(calls, x, y, layout, native_apgd.ApgdSettings.from_reference(aa.apgd_targeted))
        if attack == "square":
            settings = native_square.SquareSettings.from_reference(aa.square)
            every = self.options.square_compact_every or (1 if self.device.type == "cpu" else 8)
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
        group = self.options.fab_target_group or (1 if self.device.type == "cpu" else None)
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

    def preflight(self, x: Tensor, y: Tensor) -> None:
        self.reference.preflight(x, y)

    def finish(self, accuracy_by_stage: dict[str, float]) -> None:
        self.reference.finish(accuracy_by_stage)

    def cost_per_point(self, attack: str, num_classes: int) -> tuple[int, int]:
        return self.reference.cost_per_point(attack, num_classes)
