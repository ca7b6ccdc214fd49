"""Batch-size back-off on out-of-memory, and the GPU-only paths (skipped without CUDA)."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.support import helpers as h
from zoo.errors import ZooError
from zoo.evaluate import run, runner
from zoo.evaluate.attacks.reference import ReferenceEngine
from zoo.evaluate.attacks.native.engine import NativeEngine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _oom_above(limit, monkeypatch):
    original = ReferenceEngine.attack_batch

    def attack_batch(self, attack, x, y):
        if len(x) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, attack, x, y)

    monkeypatch.setattr(ReferenceEngine, "attack_batch", attack_batch)


def test_out_of_memory_at_the_default_batch_size_says_what_to_pass(tmp_path, synthetic_data_file, monkeypatch):
    """B defines the result, so it is never changed behind the user's back (the same B on every device)."""
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    _oom_above(4, monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 250") as info:
        run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
            device="cpu", results_dir=tmp_path / "results", model_label="tiny", progress=False)
    assert "--batch-size 125" in str(info.value)
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 1   # no second run was started


def test_out_of_memory_with_a_chosen_batch_size_says_what_to_pass(tmp_path, synthetic_data_file, monkeypatch):
    _oom_above(4, monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 8") as info:
        run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
            batch_size=8, device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run",
            model_label="tiny", progress=False)
    assert "--batch-size 4" in str(info.value)


# ---------------------------------------------------------------- the native engine: shrink device batches first

def _native_oom_above(limit, monkeypatch, attacks=None):
    """Native device batches of more than ``limit`` points (in ``attacks``, default all) raise CUDA OOM.

    Returns the log of what ran: (attack, device batch size, "ok" or "oom") per device batch.
    """
    seen = []
    original = NativeEngine._run_native

    def run_native(self, attack, calls, x, y, layout):
        if (attacks is None or attack in attacks) and len(x) > limit:
            seen.append((attack, len(x), "oom"))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append((attack, len(x), "ok"))
        return original(self, attack, calls, x, y, layout)

    monkeypatch.setattr(NativeEngine, "_run_native", run_native)
    return seen


def _probed_device_batch(monkeypatch, choose):
    """What the GPU memory probe would set (prepare probes only CUDA devices): ``choose(setup)`` points."""
    original = runner.prepare

    def prepare(*args, **kwargs):
        setup = original(*args, **kwargs)
        return dataclasses.replace(setup, device_batch=choose(setup))

    monkeypatch.setattr(runner, "prepare", prepare)


def _native_kwargs(tmp_path, data_file, name, **extra):
    kw = dict(data=data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], device="cpu",
              engine="native", results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}",
              model_label="tiny", progress=False)
    kw.update(extra)
    return kw


def test_native_out_of_memory_halves_the_device_batch_and_resumes(tmp_path, monkeypatch, caplog):
    """The device batch is not part of the configuration: halve it and resume, keeping finished stages."""
    x, y = h.synthetic_images(12, seed=2)   # 9 clean-correct points, 5 left for APGD-T
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    kw = _native_kwargs(tmp_path, data_file, "oom", batch_size=2, chunk_batches=4)
    _probed_device_batch(monkeypatch, lambda setup: 8)
    seen = _native_oom_above(4, monkeypatch, attacks=["apgd-t"])   # APGD-CE fits at 8, APGD-T only at 4
    record = run(h.train_tiny_cnn(), **kw)

    ooms = [s for s in seen if s[2] == "oom"]
    assert ooms == [("apgd-t", ooms[0][1], "oom")] and ooms[0][1] > 4   # one OOM, then it fit
    apgd_ce = [size for attack, size, _ in seen if attack == "apgd-ce"]
    assert max(apgd_ce) == 8   # batches were merged up to the probed cap
    assert sum(apgd_ce) == record.clean.correct   # APGD-CE, finished before the OOM, was not run again
    after_oom = seen[seen.index(ooms[0]) + 1:]
    assert after_oom and all(attack == "apgd-t" and size <= 4 for attack, size, _ in after_oom)   # the new cap
    assert sum(size for _, size, _ in after_oom) == ooms[0][1]   # every APGD-T point, each once
    assert record.batch_size == 2 and record.stages[1].robust.correct < record.stages[0].robust.correct
    assert "merged device batches (cap 8 points); resuming with a cap of 4" in caplog.text

    monkeypatch.undo()   # the same run without running out of memory (device batches of 4 throughout)
    _probed_device_batch(monkeypatch, lambda setup: 4)
    straight = run(h.train_tiny_cnn(), **_native_kwargs(tmp_path, data_file, "straight", batch_size=2,
                                                          chunk_batches=4))
    assert straight.config_hash == record.config_hash
    pe, pe_straight = (h.per_example(r, tmp_path / f"results-{name}")
                       for name, r in (("oom", record), ("straight", straight)))
    assert [s.robust for s in record.stages] == [s.robust for s in straight.stages]
    for key in ("clean_correct", "robust", "broken_by", "adv_pred", "adv_positions"):
        assert np.array_equal(getattr(pe, key), getattr(pe_straight, key)), key
    # APGD-T ran with the same device batches in both runs; APGD-CE's were 8 against 4 (CPU conv rounding)
    assert np.abs(pe.x_adv - pe_straight.x_adv).max() <= 1e-3


def test_native_out_of_memory_at_device_batch_b_never_changes_b(tmp_path, synthetic_data_file, monkeypatch):
    """Device batches of one reference batch cannot shrink without changing B: stop and say what to pass."""
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    _probed_device_batch(monkeypatch, lambda setup: setup.opts.batch_size)
    seen = _native_oom_above(4, monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 250") as info:
        run(h.train_tiny_cnn(), **_native_kwargs(tmp_path, synthetic_data_file, "auto", attacks=["apgd-ce"],
                                                 run_dir=None))
    assert "--batch-size 125" in str(info.value)
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 1
    assert [s[2] for s in seen] == ["oom"]   # no retry at a device batch that had already failed


def test_native_out_of_memory_with_a_chosen_batch_size_shrinks_the_device_batch_then_says_what_to_pass(
        tmp_path, synthetic_data_file, monkeypatch):
    """A chosen B still lets the device batch shrink (same run); only at device batch B does it give up."""
    model = h.train_tiny_cnn()
    x, y = h.synthetic_images(8, seed=2)   # what synthetic_data_file holds
    clean = int((model(x).argmax(1) == y).sum())
    assert clean > 4
    _probed_device_batch(monkeypatch, lambda setup: 64)
    seen = _native_oom_above(2, monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 4") as info:
        run(model, **_native_kwargs(tmp_path, synthetic_data_file, "chosen", attacks=["apgd-ce"], batch_size=4))
    assert "--batch-size 2" in str(info.value)
    # all clean-correct points in one device batch; no device batch exceeds the 8 examples, so the cap goes
    # from 64 straight to 8 // 2 = 4 = B (no pointless retries at 32 and 16); then B cannot shrink on its own
    assert seen == [("apgd-ce", clean, "oom"), ("apgd-ce", 4, "oom")]


# ---------------------------------------------------------------- CUDA only

def _gpu_run(tmp_path, synthetic_data_file, name, **kw):
    args = dict(data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"],
                device="cuda", results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}",
                model_label="tiny", progress=False)
    args.update(kw)
    model = h.train_tiny_cnn()
    record = run(model, **args)
    pe = h.per_example(record, tmp_path / f"results-{name}")
    return model, record, pe


@needs_cuda
def test_gpu_channels_last_matches_the_reference_on_the_same_model(tmp_path, synthetic_data_file):
    """As users run: the runner itself asks cuDNN for deterministic algorithms (README, precision.py)."""
    x, y = h.synthetic_images(8, seed=2)
    model, record, pe = _gpu_run(tmp_path, synthetic_data_file, "cl", batch_size=4)
    assert record.extra["channels_last"] is True and record.device.startswith("cuda:0 (")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert record.extra["tf32"] == {"matmul": False, "cudnn": False}
    assert record.extra["cudnn"] == {"deterministic": True, "benchmark": False}
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, norm="Linf", eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0,
                    device="cuda")
    from zoo.evaluate.precision import precision_mode
    with precision_mode("fp32", torch.device("cuda")):   # the reference under the runner's fp32 switches
        x_adv, y_adv = aa.run_standard_evaluation(x.cuda(), y.cuda(), batch_size=4)
    assert np.array_equal(pe.robust, (y_adv.cpu() == y).numpy())


@needs_cuda
def test_gpu_automatic_batch_size_is_deterministic(tmp_path, synthetic_data_file):
    _, first, _ = _gpu_run(tmp_path, synthetic_data_file, "a", attacks=["apgd-ce"])
    _, second, _ = _gpu_run(tmp_path, synthetic_data_file, "b", attacks=["apgd-ce"])
    assert first.batch_size == second.batch_size == 250   # the default B, on every device


@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gpu_reduced_precisions_are_recorded_and_checked_in_fp32(tmp_path, synthetic_data_file, precision):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _, record, pe = _gpu_run(tmp_path, synthetic_data_file, precision, batch_size=4, precision=precision)
    assert record.precision == precision
    assert record.extra["tf32"] == {"matmul": precision == "tf32", "cudnn": precision == "tf32"}
    assert len(record.extra["fp32_rejected_successes"]) == 2
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert pe.robust.sum() <= pe.clean_correct.sum()


@needs_cuda
def test_gpu_native_engine_in_fp32_matches_the_reference_engine(tmp_path, synthetic_data_file):
    """Merged device batches on the GPU: the same flags as the reference engine (fp32, TF32 off)."""
    attacks = ["apgd-ce", "apgd-t", "square"]
    _, ref, ref_pe = _gpu_run(tmp_path, synthetic_data_file, "ref", batch_size=2, attacks=attacks)
    _, nat, nat_pe = _gpu_run(tmp_path, synthetic_data_file, "nat", batch_size=2, attacks=attacks, engine="native")
    assert nat.engine.startswith("native ") and ref.engine.startswith("reference ")
    assert np.array_equal(nat_pe.robust, ref_pe.robust)
    assert np.array_equal(nat_pe.broken_by, ref_pe.broken_by)


@needs_cuda
def test_gpu_compiled_bf16_native_run_is_checked_in_fp32(tmp_path, synthetic_data_file):
    """torch.compile + bf16 + merged batches on the GPU; every success confirmed by an eager fp32 forward."""
    _, eager, eager_pe = _gpu_run(tmp_path, synthetic_data_file, "eager", batch_size=4, engine="native",
                                  precision="bf16")
    _, fused, fused_pe = _gpu_run(tmp_path, synthetic_data_file, "fused", batch_size=4, engine="native",
                                  precision="bf16", torch_compile="default")
    assert fused.extra["torch_compile"] == "default" and eager.extra["torch_compile"] is None
    assert fused.stages[1].backward_passes > 0
    assert abs(int(fused_pe.robust.sum()) - int(eager_pe.robust.sum())) <= 1   # bf16 rounding only
