"""Shared set-up for the native-engine tests (models, images, reference runs) and tests of the engine's plumbing.

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

from zoo.errors import BadInputError
from zoo.evaluate.attacks.native._batches import ReferenceBatches, UniformStream, uniform_draws_are_a_stream
from zoo.evaluate.attacks.native.engine import NativeEngine, NativeOptions

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
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


# ---------------------------------------------------------------- tests of the plumbing

def test_uniform_draws_form_one_stream_on_this_torch():
    """Square serves many small draws from one big one: only exact if rand's stream ignores call sizes."""
    assert uniform_draws_are_a_stream()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    stream = UniformStream(g1, chunk=64)
    got = torch.cat([stream.take(n) for n in (1, 1, 3, 100, 7, 3072, 2)])
    assert torch.equal(got, torch.rand(got.numel(), generator=g2))
    careful = UniformStream(torch.Generator().manual_seed(5))
    careful.chunked = False   # the fallback when the property does not hold: one rand call per request
    assert torch.equal(torch.cat([careful.take(n) for n in (1, 1, 3, 100, 7, 3072, 2)]), got)


def test_reference_batches_draw_what_each_reseeded_batch_would():
    layout = ReferenceBatches([3, 0, 2], seed=7, device=torch.device("cpu"))
    assert layout.batch_of.tolist() == [0, 0, 0, 2, 2]
    assert layout.counts(torch.tensor([0, 2, 3])) == [2, 0, 1]
    first = layout.draw([2, 0, 1], (3, 4, 4), normal=False)
    second = layout.draw([1, 0, 1], (3, 4, 4), normal=True)
    torch.random.manual_seed(7)
    want_a = (torch.rand(2, 3, 4, 4), torch.randn(1, 3, 4, 4))
    torch.random.manual_seed(7)
    want_c = (torch.rand(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    assert torch.equal(first, torch.cat([want_a[0], want_c[0]]))
    assert torch.equal(second, torch.cat([want_a[1], want_c[1]]))


def test_groups_respect_max_device_batch():
    engine = make_engine(trained_cnn(), "Linf", 8 / 255, options=NativeOptions(max_device_batch=10))
    assert engine._groups([4, 4, 4, 12, 1]) == [[0, 1], [2], [3], [4]]
    assert make_engine(trained_cnn(), "Linf", 8 / 255)._groups([4, 4, 4]) == [[0, 1, 2]]


def test_engine_identity_and_native_coverage():
    import zoo

    engine = make_engine(trained_cnn(), "linf", 8 / 255)
    assert engine.name == "native" and engine.version == f"{zoo.__version__}+native1"
    assert engine.norm == "Linf" and engine.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert engine.delegated_attacks == {}
    l1 = make_engine(trained_cnn(), "L1", 8.0)
    assert set(l1.delegated_attacks) == {"apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"}
    assert "L1" in l1.delegated_attacks["apgd-t"]


def test_bad_precision_and_unknown_attack_are_rejected():
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):   # a caller's bug
        make_engine(trained_cnn(), "Linf", 8 / 255, precision="fp16")
    with pytest.raises(BadInputError, match="precision 'bf16' needs native attacks"):
        make_engine(trained_cnn(), "L1", 8.0, precision="bf16")
    engine = make_engine(trained_cnn(), "Linf", 8 / 255)
    x, y = correct_points(trained_cnn(), 2)
    with pytest.raises(ValueError, match="unknown attack 'pgd'"):   # the runner checks attack names first
        engine.attack_batch("pgd", x, y)


def test_delegated_attack_is_the_reference_and_is_counted():
    """L1 Square is not native: the engine runs pyautoattack's object, with the seed reset per batch."""
    model = trained_cnn()
    x, y = correct_points(model, 6)
    engine = make_engine(model, "L1", 12.0, n_queries=30)
    aa = make_reference(model, "L1", 12.0, n_queries=30)
    got = engine.attack_batches("square", [(x[:3], y[:3]), (x[3:], y[3:])])
    want = [reference_perturb(aa, "square", x[:3], y[:3]), reference_perturb(aa, "square", x[3:], y[3:])]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    counts = engine.counters["square"]
    assert counts["forward"] >= 3 * 6 and counts["backward"] == 0  # clean pass, start, final check
    assert all(p.requires_grad for p in model.parameters())


def test_parameters_are_restored_and_get_no_gradients():
    model = trained_cnn()
    model.zero_grad(set_to_none=True)   # the reference's FAB (run by other tests) leaves gradients behind
    x, y = correct_points(model, 4)
    engine = make_engine(model, "Linf", 8 / 255)
    for attack in ("apgd-ce", "fab-t"):
        engine.attack_batch(attack, x, y)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert engine.counters["apgd-ce"]["backward"] > 0


def test_runner_memory_cap_limits_merged_device_batches():
    from zoo.evaluate.attacks.engine import make_engine

    engine = make_engine("native", trained_cnn(), norm="Linf", eps=8 / 255, version="standard", attacks=None,
                         seed=0, device="cpu", max_device_batch=48)
    assert engine.options.max_device_batch == 48
    assert make_engine("native", trained_cnn(), norm="Linf", eps=8 / 255, version="standard", attacks=None,
                       seed=0, device="cpu").options.max_device_batch is None


def test_fab_t_target_groups_stay_within_the_memory_cap():
    """FAB-T's side-by-side targets must not exceed the runner's max_device_batch (the likeliest OOM on a big
    model): groups shrink to fit, explicit or automatic, and the flags stay the reference's."""
    from zoo.evaluate.attacks.native import fab as native_fab
    from zoo.evaluate.attacks.native._batches import ModelCalls

    model = trained_cnn()
    x, y = correct_points(model, 6)
    settings = {"fab_iter": 4, "fab_targets": 4}
    want = reference_perturb(make_reference(model, "Linf", 3 / 255, **settings), "fab-t", x, y)
    sizes: list[int] = []
    hook = model.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[0]))
    try:
        free = make_engine(model, "Linf", 3 / 255, options=NativeOptions(fab_target_group=4), **settings)
        free.attack_batch("fab-t", x, y)
        assert max(sizes) == 24   # 4 targets x 6 points: what the cap must prevent
        sizes.clear()
        capped = make_engine(model, "Linf", 3 / 255, options=NativeOptions(fab_target_group=4, max_device_batch=12),
                             **settings)
        assert_flags_match(model, capped.attack_batch("fab-t", x, y), want, x, y, "fab-t, capped groups")
        assert max(sizes) == 12   # 2 targets at a time
        sizes.clear()
        s = native_fab.FabSettings.from_reference(capped.autoattack.fab, targeted=True)
        layout = ReferenceBatches([6], seed=0, device=torch.device("cpu"))
        got = native_fab.attack(ModelCalls(model, "fp32"), x, y, layout, s, target_group=None, max_points=1024,
                                point_cap=12)
        assert max(sizes) == 12   # automatic grouping too
        assert_flags_match(model, got, want, x, y, "fab-t, automatic capped groups")
    finally:
        hook.remove()
    # the engine aims automatic groups at min(fab_max_points, max_device_batch)
    assert make_engine(model, "Linf", 3 / 255, options=NativeOptions(max_device_batch=48))._fab_grouping() \
        == (1, 48, 48)   # one target at a time on a CPU, as the reference
    assert make_engine(model, "Linf", 3 / 255, options=NativeOptions(max_device_batch=4096))._fab_grouping() \
        == (1, 1024, 4096)
    assert make_engine(model, "Linf", 3 / 255)._fab_grouping() == (1, 1024, None)
