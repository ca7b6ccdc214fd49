"""Batch-size back-off on out-of-memory, and the GPU-only paths (skipped without CUDA)."""

import numpy as np
import pytest
import torch

import eval_helpers as h
from zoo.errors import ZooError
from zoo.evaluate import run
from zoo.evaluate.engine import ReferenceEngine
from zoo.evaluate.record import PerExample, per_example_path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _oom_above(limit, monkeypatch):
    original = ReferenceEngine.attack_batch

    def attack_batch(self, attack, x, y):
        if len(x) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, attack, x, y)

    monkeypatch.setattr(ReferenceEngine, "attack_batch", attack_batch)


def test_out_of_memory_halves_an_automatic_batch_size_and_starts_a_new_run(tmp_path, synthetic_data_file, monkeypatch):
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    _oom_above(4, monkeypatch)
    record = run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
                 device="cpu", results_dir=tmp_path / "results", model_label="tiny", progress=False)
    assert record.batch_size == 3   # 250 -> 125 -> 62 -> 31 -> 15 -> 7 -> 3: the first that fits
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 7   # B is part of the configuration


def test_out_of_memory_with_a_chosen_batch_size_says_what_to_pass(tmp_path, synthetic_data_file, monkeypatch):
    _oom_above(4, monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 8") as info:
        run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
            batch_size=8, device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run",
            model_label="tiny", progress=False)
    assert "--batch-size 4" in str(info.value)


# ---------------------------------------------------------------- CUDA only

def _gpu_run(tmp_path, synthetic_data_file, name, **kw):
    args = dict(data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], device="cuda",
                results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}", model_label="tiny",
                progress=False)
    args.update(kw)
    model = h.train_tiny_cnn()
    record = run(model, **args)
    pe = PerExample.read(per_example_path(tmp_path / f"results-{name}" / record.relative_path()))
    return model, record, pe


@pytest.fixture
def deterministic_cudnn():
    """Bit-reproducible convolutions for the comparison; global switches restored afterwards."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before


@needs_cuda
def test_gpu_channels_last_matches_the_reference_on_the_same_model(tmp_path, synthetic_data_file, deterministic_cudnn):
    x, y = h.synthetic_images(8, seed=2)
    model, record, pe = _gpu_run(tmp_path, synthetic_data_file, "cl", batch_size=4)
    assert record.extra["channels_last"] is True and record.device.startswith("cuda:0 (")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert record.extra["tf32"] == {"matmul": False, "cudnn": False}
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, norm="Linf", eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0,
                    device="cuda")
    torch.backends.cudnn.allow_tf32 = False   # the runner's fp32 mode (restored by the fixture)
    x_adv, y_adv = aa.run_standard_evaluation(x.cuda(), y.cuda(), batch_size=4)
    assert np.array_equal(pe.robust, (y_adv.cpu() == y).numpy())


@needs_cuda
def test_gpu_automatic_batch_size_is_deterministic(tmp_path, synthetic_data_file):
    _, first, _ = _gpu_run(tmp_path, synthetic_data_file, "a", attacks=["apgd-ce"])
    _, second, _ = _gpu_run(tmp_path, synthetic_data_file, "b", attacks=["apgd-ce"])
    assert first.batch_size == second.batch_size == 8   # min(n, 1024) fits easily


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
