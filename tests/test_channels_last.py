"""channels_last models on the CPU, every norm, both engines: the attacks must not assume NCHW-contiguous
gradients (a channels_last model's input gradient is channels_last), and flags match the contiguous run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo.evaluate import cli, cpus, run

from tests.support import helpers as h

EPS = {"linf": h.TINY_EPS, "l2": 0.1, "l1": 1.0}
ATTACKS = {"linf": ["apgd-ce", "apgd-t", "fab-t"], "l2": ["apgd-ce", "apgd-t", "fab-t"], "l1": ["apgd-ce", "apgd-t"]}


def test_a_channels_last_model_gives_channels_last_input_gradients():
    """What the tests below rely on: otherwise they would not exercise the strided layout at all."""
    model = h.train_tiny_cnn().to(memory_format=torch.channels_last)
    x = h.synthetic_images(2, seed=0)[0].requires_grad_(True)
    grad, = torch.autograd.grad(model(x).sum(), x)
    assert not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("engine", ["reference", "native"])
@pytest.mark.parametrize("threat", ["linf", "l2", "l1"])
def test_channels_last_runs_every_norm_with_the_contiguous_flags(tmp_path, threat, engine):
    x, y = h.synthetic_images(6, seed=2)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    flags = {}
    for layout in (False, True):
        name = f"cl-{layout}"
        record = run(h.train_tiny_cnn(), data=data_file, threat=threat, eps=EPS[threat], version="custom",
                     attacks=ATTACKS[threat], device="cpu", channels_last=layout, engine=engine, batch_size=3,
                     results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}", model_label="tiny",
                     progress=False)
        assert record.extra["channels_last"] is layout
        pe = h.per_example(record, tmp_path / f"results-{name}")
        flags[layout] = (pe.robust, pe.broken_by)
    for a, b in zip(flags[False], flags[True]):
        assert np.array_equal(a, b)


def test_cpu_default_layout_is_channels_last_for_bf16_only(tmp_path, monkeypatch):
    """bf16 on a CPU defaults to channels_last (the faster layout of oneDNN's bf16 kernels), fp32 keeps NCHW;
    --channels-last / --no-channels-last override either way."""
    monkeypatch.setattr(cpus, "native_bf16", lambda: "amx_bf16")
    x, y = h.synthetic_images(4, seed=2)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    for precision, expected in (("fp32", False), ("bf16", True)):
        model = h.train_tiny_cnn()
        record = run(model, data=data_file, eps=EPS["linf"], version="custom", attacks=["apgd-ce"], device="cpu",
                     precision=precision, batch_size=4, results_dir=tmp_path / f"r-{precision}",
                     run_dir=tmp_path / f"run-{precision}", model_label="tiny", progress=False, threads=1)
        assert record.extra["channels_last"] is expected
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last) is expected
    parse = cli._run_parser().parse_args
    assert (parse([]).channels_last, parse(["--channels-last"]).channels_last,
            parse(["--no-channels-last"]).channels_last) == (None, True, False)
