"""Attack engines: what runs ONE batch of ONE attack. The runner owns the schedule around it.

The runner reproduces AutoAttack's ``run_standard_evaluation`` loop (clean pass, then per attack the
sorted robust indices cut into batches of B, seed reset per batch) and calls ``engine.attack_batch`` where
the reference calls ``attack.perturb``. ``ReferenceEngine`` delegates to pyautoattack itself, setting the
attack objects up exactly as the reference loop does before each batch; a native engine can implement the
same interface and be checked against it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn

from zoo.errors import BadInputError

NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
VERSIONS = ("standard", "plus", "rand", "custom")
KNOWN_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class Engine(Protocol):
    name: str
    version: str
    attacks: tuple[str, ...]

    def attack_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial candidates for one batch (contiguous NCHW in [0, 1]); same shape as ``x``."""

    def replay(self, done: Sequence[str]) -> None:
        """Bring the attack objects into the state they have after running ``done`` (for resuming)."""

    def preflight(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Warnings about the model (randomised, probabilities, too few classes) before any attack."""

    def finish(self, accuracy_by_stage: dict[str, float]) -> None:
        """Warnings about the outcome (e.g. Square beating the gradient attacks)."""

    def cost_per_point(self, attack: str, num_classes: int) -> tuple[int, int]:
        """Upper bound of (forward, backward) passes per example for ``attack``."""


class AttackView(nn.Module):
    """The model as the attacks see it: counts images forwarded / backpropagated, optionally bf16 autocast.

    Counting happens here rather than in the engine so every engine reports the same quantities.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None,
                 fp32_model: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.fp32_model = model if fp32_model is None else fp32_model   # eager, for checks in full precision
        self.forward_images = 0
        self.backward_images = 0

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backward_images += grad.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_images += x.shape[0]
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                out = self.model(x)
            out = out.float()
        else:
            out = self.model(x)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def take_counts(self) -> tuple[int, int]:
        counts = (self.forward_images, self.backward_images)
        self.forward_images = self.backward_images = 0
        return counts


class ReferenceEngine:
    """pyautoattack's own attack objects, configured per batch exactly as its evaluation loop does."""

    name = "reference"

    def __init__(self, model: nn.Module, *, norm: str, eps: float, version: str, attacks: Sequence[str] | None,
                 seed: int, device: torch.device | str):
        import pyautoattack

        self.version = pyautoattack.__version__
        self.seed = int(seed)
        self.autoattack = pyautoattack.AutoAttack(model, attacks=list(attacks) if version == "custom" else None,
                                           device=device, eps=eps, norm=norm, seed=self.seed, version=version)
        self.attacks = tuple(self.autoattack.attacks_to_run)

    @staticmethod
    def attacks_for(version: str, norm: str) -> list[str]:
        """The attack sequence pyautoattack runs for ``version`` (read from pyautoattack, not copied)."""
        import pyautoattack

        if version == "custom":
            raise BadInputError("version 'custom' has no fixed attack list", hint="pass --attacks a,b,c")
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
        raise BadInputError(f"unknown attack {attack!r}", hint=f"use some of {', '.join(KNOWN_ATTACKS)}")

    def attack_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.configured(attack).perturb(x, y)

    def replay(self, done: Sequence[str]) -> None:
        for attack in done:
            self.configured(attack)

    def preflight(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from pyautoattack import checks

        aa = self.autoattack
        forward = aa.get_logits
        if aa.version != "rand":
            checks.check_randomized(forward, x, y, bs=len(x), logger=aa.logger)
        n_cls = checks.check_range_output(forward, x, logger=aa.logger)
        checks.check_dynamic(aa.model, x, False, logger=aa.logger)
        checks.check_n_classes(n_cls, list(self.attacks), aa.apgd_targeted.n_target_classes,
                               aa.fab.n_target_classes, logger=aa.logger)

    def finish(self, accuracy_by_stage: dict[str, float]) -> None:
        from pyautoattack import checks

        checks.check_square_sr(accuracy_by_stage, logger=self.autoattack.logger)

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
        raise BadInputError(f"unknown attack {attack!r}")


# name -> engine class, or "module:Class" (relative to this package) imported on first use.
ENGINES: dict[str, object] = {"reference": ReferenceEngine, "native": ".native_engine:NativeEngine"}


def engine_class(name: str):
    try:
        entry = ENGINES[name]
    except KeyError:
        raise BadInputError(f"unknown engine {name!r}", hint=f"use one of {', '.join(ENGINES)}") from None
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            module = importlib.import_module(module_name, package=__package__)
            entry = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise BadInputError(f"engine {name!r} is not available ({type(exc).__name__}: {exc})",
                                hint="use --engine reference") from None
    return entry


def make_engine(name: str, model: nn.Module, *, precision: str = "fp32", max_device_batch: int | None = None,
                **kwargs) -> Engine:
    """Build engine ``name``; ``precision`` and ``max_device_batch`` go to the engines that take them."""
    cls = engine_class(name)
    accepted = inspect.signature(cls).parameters
    if "precision" in accepted:
        kwargs["precision"] = "bf16" if precision == "bf16" else "fp32"  # tf32 is a global switch, not autocast
    if "max_device_batch" in accepted:
        kwargs["max_device_batch"] = max_device_batch
    return cls(model, **kwargs)


# ---------------------------------------------------------------- cost of one forward pass

@dataclass(frozen=True)
class ModelCost:
    macs_per_image: int | None
    parameters: int


def count_macs(model: nn.Module, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> ModelCost:
    """Multiply-accumulates of one forward pass on one image, summed over Conv and Linear layers.

    Counted with forward hooks on a single input; layers other than Conv/Linear are ignored (they are cheap
    next to them in CIFAR networks). None when the model has no such layers.
    """
    total = 0
    seen = False

    def hook(module, inputs, output):
        nonlocal total, seen
        seen = True
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups
            for k in module.kernel_size:
                per_out *= k
            total += int(output[0].numel()) * per_out
        else:
            total += int(output[0].numel()) * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(macs_per_image=total if seen else None, parameters=params)
