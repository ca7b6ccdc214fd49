"""Attack engines: what runs ONE batch of ONE attack. The runner owns the schedule around it.

The runner reproduces AutoAttack's ``run_standard_evaluation`` loop (clean pass, then per attack the
sorted robust indices cut into batches of B, seed reset per batch) and calls ``engine.attack_batches`` where
the reference calls ``attack.perturb``. ``reference.ReferenceEngine`` delegates to pyautoattack itself,
setting the attack objects up exactly as the reference loop does before each batch; ``native.NativeEngine``
implements the same interface and is checked against it.
"""

from __future__ import annotations

import importlib
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from zoo.errors import BadInputError

VERSIONS = ("standard", "plus", "rand", "custom")
KNOWN_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class Engine:
    """The interface the runner calls, with what an engine can do declared rather than probed.

    Capabilities (class attributes):
    - ``autocast_aware``: the engine takes ``precision`` ("fp32" | "bf16"), runs its own bf16 autocast and
      confirms claimed successes in fp32; other engines are attacked through the runner's autocast view.
    - ``merges_batches``: ``attack_batches`` may run several reference batches as one device batch and takes
      ``max_device_batch`` (a cap the runner shrinks on out-of-memory); others attack one batch at a time.
    """

    name: ClassVar[str]
    version: ClassVar[str]           # recorded, and part of the configuration hash
    autocast_aware: ClassVar[bool] = False
    merges_batches: ClassVar[bool] = False
    attacks: tuple[str, ...]

    @classmethod
    def engine_version(cls) -> str:
        return cls.version

    @staticmethod
    def attacks_for(version: str, norm: str) -> list[str]:
        """The attack sequence of ``version`` under ``norm``."""
        raise NotImplementedError

    def attack_batch(self, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial candidates for one batch (contiguous NCHW in [0, 1]); same shape as ``x``."""
        raise NotImplementedError

    def attack_batches(self, attack: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``attack_batch`` for each reference batch of a chunk (engines that merge batches override it)."""
        return [self.attack_batch(attack, x, y) for x, y in batches]

    def replay(self, done: Sequence[str]) -> None:
        """Bring the attack objects into the state they have after running ``done`` (for resuming)."""

    def cost_per_point(self, attack: str, num_classes: int) -> tuple[int, int]:
        """Upper bound of (forward, backward) passes per example for ``attack``."""
        raise NotImplementedError

    def take_zero_gradients(self) -> int | None:
        """Points attacked since the last call whose initial APGD gradient (DLR and targeted DLR losses) was
        exactly zero, counted as pyautoattack's ``checks.check_zero_gradients`` counts them (once per run of
        APGD: per restart and per target class); None when the engine does not count them."""
        return None


def zero_gradient_points(grad: torch.Tensor) -> torch.Tensor:
    """How many points of ``grad`` (examples first) have a gradient of exactly zero, as a 0-d tensor left on
    its device; pyautoattack's ``checks.check_zero_gradients`` counts the same."""
    return (grad.reshape(grad.shape[0], -1).abs().sum(-1) == 0).sum()


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
        self.listener: Callable[[int], None] | None = None   # told every pass's image count (progress)

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backward_images += grad.shape[0]
        if self.listener is not None:
            self.listener(grad.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_images += x.shape[0]
        if self.listener is not None:
            self.listener(x.shape[0])
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


# name -> engine class, or "module:Class" (relative to this package) imported on first use, so choosing an
# engine loads only that engine. A plugin (or a test) may register its own class here.
ENGINES: dict[str, type[Engine] | str] = {"reference": ".reference:ReferenceEngine",
                                          "native": ".native.engine:NativeEngine"}


def engine_class(name: str) -> type[Engine]:
    try:
        entry = ENGINES[name]
    except KeyError:
        raise BadInputError(f"unknown engine {name!r}", hint=f"use one of {', '.join(ENGINES)}") from None
    if not isinstance(entry, str):
        return entry
    module_name, _, attr = entry.partition(":")
    try:
        return getattr(importlib.import_module(module_name, package=__package__), attr)
    except (ImportError, AttributeError) as exc:
        raise BadInputError(f"engine {name!r} is not available ({type(exc).__name__}: {exc})",
                            hint="use --engine reference") from None


def make_engine(name: str, model: nn.Module, *, precision: str = "fp32", max_device_batch: int | None = None,
                **kwargs) -> Engine:
    """Build engine ``name``; ``precision`` and ``max_device_batch`` go to the engines that declare them."""
    cls = engine_class(name)
    if cls.autocast_aware:
        kwargs["precision"] = "bf16" if precision == "bf16" else "fp32"  # tf32 is a global switch, not autocast
    if cls.merges_batches:
        kwargs["max_device_batch"] = max_device_batch
    return cls(model, **kwargs)
