"""Shared set-up for the native-engine tests and the bench scripts (models, images, reference runs).

Models: a small CNN trained here on real CIFAR-10 images (synthetic ones when ../shared is absent), and
CNN-A-Adv, a real PGD-trained CIFAR-10 network from ../shared/models (skipped when absent).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from zoo.evaluate.attacks.native.engine import NativeEngine

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
CIFAR = SHARED / "data" / "cifar10_test_first1000.npz"
CNN_A = SHARED / "models" / "cifar10_cnn_a_adv_at2px_sdpfo.pth"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


class Normalized(nn.Module):
    """[0, 1] images in, logits out; per-channel normalisation inside, as every zoo model does."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def calibrated(real: float, synthetic: float) -> float:
    """A test's eps for real CIFAR-10 or for the synthetic stand-in (on which the small CNN is far more robust
    to Square's L2 steps and FAB's few iterations), chosen so the case has both robust and fooled points."""
    return real if CIFAR.is_file() else synthetic


def images(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real CIFAR-10 test images (contiguous NCHW in [0, 1]) or, without ../shared, fixed synthetic ones."""
    if CIFAR.is_file():
        data = np.load(CIFAR)
        x = torch.from_numpy(data["x"][offset:offset + n]).permute(0, 3, 1, 2).float().div(255).contiguous()
        return x, torch.from_numpy(data["y"][offset:offset + n]).long()
    g = torch.Generator().manual_seed(offset)
    y = torch.randint(0, 10, (n,), generator=g)
    base = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(99))
    x = (base[y] + 0.25 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1).contiguous()
    return x, y


@functools.lru_cache(maxsize=None)
def trained_cnn() -> nn.Module:
    """A small CNN trained for a few seconds on 600 images (kept out of the images the tests attack)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    model = Normalized(net, CIFAR_MEAN, CIFAR_STD)
    x, y = images(600, offset=400)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, 600, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def cnn_a() -> nn.Module:
    """CNN-A-Adv (SDP-FO), PGD-trained at 2/255; see ../shared/models/MODELS.md."""
    if not CNN_A.is_file():
        pytest.skip(f"real robust model not available ({CNN_A} is absent)")
    net = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2048, 100), nn.ReLU(), nn.Linear(100, 10))
    net.load_state_dict(torch.load(CNN_A, map_location="cpu", weights_only=True))
    mean, std = (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)
    return Normalized(net, mean, std).eval()


def correct_points(model: nn.Module, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` correctly classified test images from ``start`` on (the runner only attacks those)."""
    x, y = images(400, offset=start)
    with torch.no_grad():
        keep = model(x).max(1)[1] == y
    return x[keep][:n].contiguous(), y[keep][:n]


def make_reference(model, norm, eps, version="standard", seed=0, **settings):
    """pyautoattack configured like the engine's, with test-sized settings applied to both."""
    import pyautoattack

    aa = pyautoattack.AutoAttack(model, norm=norm, eps=eps, seed=seed, version=version, device="cpu")
    apply_settings(aa, **settings)
    return aa


def apply_settings(aa, n_queries=None, fab_iter=None, apgd_targets=None, fab_targets=None):
    if n_queries is not None:
        aa.square.n_queries = n_queries
    if fab_iter is not None:
        aa.fab.n_iter = fab_iter
    if apgd_targets is not None:
        aa.apgd_targeted.n_target_classes = apgd_targets
    if fab_targets is not None:
        aa.fab.n_target_classes = fab_targets


def make_engine(model, norm, eps, version="standard", seed=0, options=None, precision="fp32", **settings):
    engine = NativeEngine(model, norm=norm, eps=eps, seed=seed, version=version, device="cpu",
                          precision=precision, options=options)
    apply_settings(engine.autoattack, **settings)
    return engine


def reference_perturb(aa, attack: str, x, y, seed: int = 0) -> torch.Tensor:
    """One batch the way run_standard_evaluation runs it: set up the object, reseed, perturb, no grad."""
    if attack in ("apgd-ce", "apgd-dlr"):
        obj = aa.apgd
        obj.loss = "ce" if attack == "apgd-ce" else "dlr"
    elif attack == "apgd-t":
        obj = aa.apgd_targeted
    elif attack == "square":
        obj = aa.square
    else:
        obj = aa.fab
        obj.targeted = attack == "fab-t"
        if obj.targeted:
            obj.n_restarts = 1
    obj.seed = seed
    with torch.no_grad():
        return obj.perturb(x.clone(), y.clone())


def fooled(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).max(1)[1] != y


def margins(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], -float("inf")).max(1)[0]


def assert_flags_match(model, got, want, x, y, what: str) -> None:
    """Per-example robust flags equal; on failure list each disagreement with its margin."""
    g, w = fooled(model, got, y), fooled(model, want, y)
    bad = (g != w).nonzero().squeeze(1).tolist()
    assert not bad, f"{what}: flags differ at {bad}: native margins {margins(model, got, y)[bad].tolist()}, " \
                    f"reference margins {margins(model, want, y)[bad].tolist()}"


def assert_merged_matches_separate(model, engine, aa, attack, x, y, sizes) -> torch.Tensor:
    """Merged reference batches give the flags of running the reference on each batch separately."""
    parts = list(zip(x.split(sizes), y.split(sizes)))
    merged = torch.cat(engine.attack_batches(attack, parts))
    separate = torch.cat([reference_perturb(aa, attack, xb, yb) for xb, yb in parts])
    assert_flags_match(model, merged, separate, x, y, f"{attack} merged {sizes}")
    return merged
