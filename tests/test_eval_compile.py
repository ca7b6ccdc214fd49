"""``--torch-compile``: the attacks through torch.compile, padded to a few batch shapes, same results."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from tests.support import helpers as h
from tests.support.faithful import MERGED_X_ADV_TOLERANCE, TINY_ATTACKS
from tests.support.faithful import (assert_same_as_reference as _assert_same_as_reference, run_and_read as _run,
                                    tiny_reference as _tiny_reference)
from zoo.errors import BadInputError
from zoo.evaluate import plan, run, runner
from zoo.evaluate.options import RunOptions
from zoo.evaluate.prepare import prepare
from zoo.evaluate.attacks import compiled
from zoo.evaluate.attacks.native.engine import NativeEngine
from zoo.evaluate.cli import main as zoo_eval

needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="torch.compile's CPU backend needs a C++ compiler")


def test_bucket_sizes_are_few_and_never_too_small():
    sizes = {compiled.bucket_size(n) for n in range(1, 4097)}
    assert all(compiled.bucket_size(n) >= n for n in range(1, 4097))
    assert max(compiled.bucket_size(n) / n for n in range(9, 4097)) <= 4 / 3 + 1e-9
    assert len(sizes) <= 4 * 10   # four per doubling from 8 to 4096
    assert compiled.bucket_size(250) == 256 and compiled.bucket_size(1) == compiled.SMALLEST_BUCKET


def test_padded_batches_give_the_same_logits_and_input_gradients():
    model = h.train_tiny_cnn()
    x, _ = h.synthetic_images(13, seed=4)
    padded = compiled.PaddedBatches(model)
    calls = []
    padded.module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_a, out_b = model(xa), padded(xb)
    assert calls[-1] == compiled.bucket_size(13) == 14 and out_b.shape == out_a.shape
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-5)
    (ga,), (gb,) = torch.autograd.grad(out_a[:, 3].sum(), [xa]), torch.autograd.grad(out_b[:, 3].sum(), [xb])
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-6)


def test_unknown_mode_and_a_failing_compile_are_clear_errors(monkeypatch):
    model = h.train_tiny_cnn()
    with pytest.raises(BadInputError, match="unknown torch.compile mode"):
        compiled.compiled_for_attacks(model, "fastest", (3, 32, 32), torch.device("cpu"))

    def broken_compile(module, **kwargs):
        def fails(x):
            raise RuntimeError("backend exploded\nlong traceback")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(BadInputError, match="backend exploded") as err:
        compiled.compiled_for_attacks(model, "default", (3, 32, 32), torch.device("cpu"))
    assert "drop --torch-compile" in err.value.hint and "long traceback" not in str(err.value)


def test_cli_refuses_an_unknown_mode(capsys):
    assert zoo_eval(["--model", "score-wrn-28-10", "--torch-compile", "fastest", "--dry-run"]) == 2
    assert "--torch-compile" in capsys.readouterr().err


def test_compile_mode_is_part_of_the_configuration(tmp_path, monkeypatch):
    x, y = h.synthetic_images(8, seed=2)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    kw = dict(data=data_file, model_label="tiny", results_dir=tmp_path / "res", device="cpu", eps=h.TINY_EPS)
    built = []
    monkeypatch.setattr(runner, "compiled_for_attacks", lambda *args, **kwargs: built.append(args))
    eager = prepare(h.train_tiny_cnn(), RunOptions(**kw))
    fused = prepare(h.train_tiny_cnn(), RunOptions(torch_compile="default", **kw))
    assert fused.config["torch_compile"] == "default" and eager.config["torch_compile"] is None
    assert fused.config_hash != eager.config_hash
    plan(h.train_tiny_cnn(), torch_compile="default", **kw)
    assert built == []   # planning compiles nothing


@needs_compiler
@pytest.mark.parametrize("engine", ["reference", "native"])
def test_compiled_run_matches_the_reference(tmp_path, engine):
    """Measured on this CPU: flags identical, x_adv bit-identical for the reference engine."""
    model = h.train_tiny_cnn()
    x, y, ref = _tiny_reference()
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    record, pe = _run(model, data_file, tmp_path, eps=h.TINY_EPS, version="custom", attacks=list(TINY_ATTACKS),
                      batch_size=8, chunk_batches=2, engine=engine, torch_compile="default")
    assert record.extra["torch_compile"] == "default"
    assert record.stages[1].backward_passes > 0
    _assert_same_as_reference(record, pe, ref, x, MERGED_X_ADV_TOLERANCE)
    assert np.array_equal(pe.robust, ref["robust"].numpy())


@needs_compiler
@pytest.mark.parametrize("engine", ["reference", "native"])
def test_compiled_untargeted_fab_differentiates_one_forward_per_class(tmp_path, engine):
    """FAB's Jacobian takes one backward per class through one compiled forward (retain_graph=True)."""
    model = h.train_tiny_cnn()
    x, y = h.synthetic_images(8, seed=3)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    kw = dict(eps=h.TINY_EPS, version="custom", attacks=["fab"], batch_size=4, engine=engine)
    _, eager = _run(model, data_file, tmp_path, name="eager", **kw)
    record, fused = _run(model, data_file, tmp_path, name="fused", torch_compile="default", **kw)
    assert record.stages[0].backward_passes > 0
    assert np.array_equal(fused.robust, eager.robust)
    assert np.abs(fused.full_x_adv(x.numpy()) - eager.full_x_adv(x.numpy())).max() <= MERGED_X_ADV_TOLERANCE


def test_out_of_memory_drops_the_compiled_model_before_retrying(tmp_path, synthetic_data_file, monkeypatch):
    """CUDA graphs hold memory pools: after an out-of-memory error the retry compiles afresh."""
    built = []

    def fake_compile(model, mode, image_shape, device, autocast_dtype=None):
        built.append(mode)
        return model

    monkeypatch.setattr(runner, "compiled_for_attacks", fake_compile)
    original_prepare = runner.prepare
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: dataclasses.replace(original_prepare(*a, **k),
                                                                              device_batch=8))   # as probed
    original = NativeEngine._run_native

    def run_native(self, attack, calls, x, y, layout):
        if len(x) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, attack, calls, x, y, layout)

    monkeypatch.setattr(NativeEngine, "_run_native", run_native)
    record = run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
                 device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run", model_label="tiny",
                 progress=False, engine="native", batch_size=2, torch_compile="reduce-overhead")
    assert record.batch_size == 2 and record.extra["torch_compile"] == "reduce-overhead"
    assert len(built) >= 2 and set(built) == {"reduce-overhead"}


@needs_compiler
def test_cli_compiled_run_then_resume_keeps_the_mode(tmp_path, monkeypatch, capsys):
    """zoo-eval --torch-compile runs a registry model; --resume of its folder rebuilds the same configuration."""
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    args = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file), "--attacks",
            "apgd-ce", "--eps", "1/255", "--batch-size", "3", "--device", "cpu", "--results-dir",
            str(tmp_path / "results"), "--run-dir", str(run_dir), "--no-progress", "--torch-compile", "default"]
    assert zoo_eval(args) == 0
    first = capsys.readouterr().out
    assert zoo_eval(["--resume", str(run_dir), "--no-progress"]) == 0   # finished: same record, no attack
    again = capsys.readouterr().out
    assert first.strip().splitlines()[0] == again.strip().splitlines()[0]
    assert zoo_eval(["--resume", str(run_dir), "--torch-compile", "max-autotune", "--no-progress"]) == 2
    assert "torch_compile" in capsys.readouterr().err
