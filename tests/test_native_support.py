"""Tests of the native engine's plumbing (random streams, batch layout, grouping, delegation); the shared
set-up of the native-engine tests lives in tests/support/native.py."""

from __future__ import annotations

import pytest
import torch

from tests.support.native import (correct_points, make_engine, make_reference, reference_perturb,
                                  assert_flags_match, trained_cnn)
from zoo.errors import BadInputError
from zoo.evaluate.attacks.native._batches import ReferenceBatches, UniformStream, uniform_draws_are_a_stream
from zoo.evaluate.attacks.native.engine import NativeOptions


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
