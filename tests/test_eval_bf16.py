"""bf16 runs on CPUs with native bf16, and the initial-mask bug: an image fp32 classifies correctly but bf16
does not must still be attacked (evaluate/bf16.py), and rejections count only real claims of success."""

import numpy as np
import pytest
import torch
from torch import nn

from tests.support import helpers as h
from zoo.errors import BadInputError
from zoo.evaluate import cpus, run
from zoo.evaluate import runner as runner_mod

FLIP = 2                  # position of the image whose prediction bf16 flips
EPS = 0.01


def flip_model() -> nn.Module:
    """A linear classifier on 3x2x2 images whose class-0 / class-1 logits differ by 2e-5 in fp32 on the
    FLIP image, while bf16 rounding (0.334 -> 0.333984, 0.50198 -> 0.503906) puts class 1 ahead by 0.002."""
    lin = nn.Linear(12, 10, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0], lin.weight[0, 2] = 3.0, -2.0     # logit 0 = 3 p0 - 2 p2
        lin.weight[1, 1], lin.weight[1, 2] = 1.0, -1.0     # logit 1 = p1 - p2
        for c in range(2, 10):                             # other classes: distinct, far from the FLIP image
            lin.weight[c, c + 2] = 1.0
            lin.weight[c, 2] = -1.0
    return nn.Sequential(nn.Flatten(), lin).eval()


def flip_data(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 2, 2, generator=g)
    flat = x[FLIP].view(-1)
    flat[:] = 0.0
    flat[0], flat[1], flat[2] = 0.334, 0.50198, 0.5
    model = flip_model()
    with torch.no_grad():
        y = model(x).argmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = model(x).float().argmax(1)
    assert y[FLIP] == 0 and y16[FLIP] == 1, "the constructed image no longer flips under bf16"
    return model, h.write_npz(tmp_path / "flip.npz", x, y)


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    """bf16 allowed on this CPU whatever it is (emulated bf16 computes the same, only slower)."""
    monkeypatch.setattr(cpus, "native_bf16", lambda: "amx_bf16")


def _kw(tmp_path, data, name, **extra):
    kw = dict(data=str(data), eps=EPS, version="custom", attacks=["apgd-ce"], batch_size=4, device="cpu",
              results_dir=str(tmp_path / f"results-{name}"), run_dir=str(tmp_path / f"run-{name}"),
              model_label="flip", progress=False, threads=1)
    kw.update(extra)
    return kw


def _pe(tmp_path, name, record):
    return h.per_example(record, tmp_path / f"results-{name}")


@pytest.mark.parametrize("engine", ["reference", "native"])
def test_an_image_bf16_misclassifies_is_still_attacked(tmp_path, native_bf16_cpu, engine):
    model, data = flip_data(tmp_path)
    fp32 = run(model, **_kw(tmp_path, data, "fp32", engine=engine))
    bf16 = run(model, **_kw(tmp_path, data, "bf16", engine=engine, precision="bf16"))
    a, b = _pe(tmp_path, "fp32", fp32), _pe(tmp_path, "bf16", bf16)
    assert a.clean_correct[FLIP] and b.clean_correct[FLIP]          # clean flags come from fp32
    assert not a.robust[FLIP] and not b.robust[FLIP]                # broken in fp32, and in bf16 too
    assert b.broken_by[FLIP] == 0
    assert bf16.robust == fp32.robust
    assert bf16.extra["fp32_rejected_successes"] == [0]             # skipping a point is no rejection
    assert bf16.precision == "bf16" and bf16.extra["threads"] == 1


class NoGradient(nn.Module):
    """The flip model on the input's value with an exactly zero input gradient (x.detach() + 0 * x)."""

    def __init__(self):
        super().__init__()
        self.inner = flip_model()

    def forward(self, x):
        return self.inner(x.detach() + 0 * x)


@pytest.mark.parametrize("engine", ["reference", "native"])
def test_zero_gradients_of_the_fp32_second_chance_are_counted(tmp_path, native_bf16_cpu, engine):
    """bf16 skips the FLIP image and the fp32 second chance attacks it: both engines' APGD runs count."""
    _, data = flip_data(tmp_path)
    kw = dict(engine=engine, attacks=["apgd-dlr"], seed=0)
    counts = {p: run(NoGradient().eval(), **_kw(tmp_path, data, p, precision=p, **kw))
              .checks["results"]["zero_gradients"]["per_attack"]["apgd-dlr"] for p in ("fp32", "bf16")}
    assert counts["fp32"] > 0 and counts["bf16"] == counts["fp32"], counts


def test_without_the_fp32_second_chance_the_image_would_stay_robust(tmp_path, native_bf16_cpu, monkeypatch):
    """The bug the second chance fixes, shown: APGD returns the image unchanged as 'already adversarial'."""
    model, data = flip_data(tmp_path)
    monkeypatch.setattr(runner_mod, "fp32_second_chance", lambda setup, state, eng, attack, stage, batches, advs:
                        (advs, [None] * len(advs)))
    bf16 = run(model, **_kw(tmp_path, data, "bug", precision="bf16"))
    assert _pe(tmp_path, "bug", bf16).robust[FLIP]


def test_bf16_refused_where_the_cpu_would_emulate_it(tmp_path, monkeypatch):
    model, data = flip_data(tmp_path)
    monkeypatch.setattr(cpus, "native_bf16", lambda: None)
    with pytest.raises(BadInputError, match="would emulate it") as info:
        run(model, **_kw(tmp_path, data, "slow", precision="bf16"))
    assert "--precision fp32" in info.value.hint
    with pytest.raises(BadInputError, match="tf32 needs a GPU"):
        run(model, **_kw(tmp_path, data, "tf32", precision="tf32"))


def test_cpu_flags_detection(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    monkeypatch.setattr(cpus, "CPUINFO", info)
    assert cpus.native_bf16() == "avx512_bf16" and cpus.cpu_model() == "Test CPU"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpus.native_bf16() is None
    monkeypatch.setattr(cpus, "CPUINFO", tmp_path / "missing")
    assert cpus.native_bf16() is None and cpus.cpu_flags() == set()


def test_default_threads_never_oversubscribe(monkeypatch):
    monkeypatch.setattr(cpus, "available_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)   # torch's own default: one per core
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpus.resolve_threads(None, (0, 1), False) == 8
    assert cpus.resolve_threads(None, (1, 2), False) == 4            # two --shard jobs on this machine
    assert cpus.resolve_threads(None, (0, 16), False) == 1           # never below one
    assert cpus.resolve_threads(3, (0, 2), False) == 3               # --threads wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpus.resolve_threads(None, (5, 8), True) == 2             # torchrun: ranks on this node
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpus.resolve_threads(None, (1, 2), True) == 4             # no LOCAL_WORLD_SIZE: all ranks here
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert cpus.resolve_threads(None, (1, 2), False) == 8            # Slurm binds each task's CPUs itself
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # the caller already chose one thread: kept
    assert cpus.resolve_threads(None, (0, 1), False) == 1


def test_threads_applied_during_the_run_and_restored(tmp_path, monkeypatch):
    model, data = flip_data(tmp_path)
    seen = []
    original = runner_mod._run_shard

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "_run_shard", spy)
    before = torch.get_num_threads()
    record = run(model, **_kw(tmp_path, data, "threads", threads=2))
    assert seen == [2] and record.extra["threads"] == 2 and torch.get_num_threads() == before
    with pytest.raises(BadInputError, match="threads must be a positive integer"):
        run(model, **_kw(tmp_path, data, "zero", threads=0))


@pytest.mark.skipif(not (h.CNN_A_ADV.exists() and h.SHARED_DATA.exists()), reason="needs ../shared (real nets)")
def test_cnn_a_adv_image_48_is_attacked_in_bf16(tmp_path, native_bf16_cpu):
    """Real case: CNN-A-Adv, CIFAR-10 test image 48 (fp32 margin +0.0027, misclassified under bf16)."""
    x, y = h.shared_cifar(49)
    data = h.write_npz(tmp_path / "c.npz", x, y)
    model = h.cnn_a_adv()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x[48:49]).argmax(1).item() != y[48].item()
    kw = dict(eps="2/255", batch_size=49, model_label="cnn-a-adv")
    fp32 = run(model, **_kw(tmp_path, data, "c32", **kw))
    bf16 = run(model, **_kw(tmp_path, data, "c16", precision="bf16", **kw))
    a, b = _pe(tmp_path, "c32", fp32), _pe(tmp_path, "c16", bf16)
    assert a.clean_correct[48] and not a.robust[48]
    assert not b.robust[48]
    assert bf16.extra["fp32_rejected_successes"] == [0]
    assert abs(int(a.robust.sum()) - int(b.robust.sum())) <= 1
    assert np.array_equal(a.clean_correct, b.clean_correct)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("engine", ["reference", "native"])
def test_gpu_bf16_initial_mask(tmp_path, engine):
    """On CUDA: the image cuBLAS's bf16 misclassifies (fp32 margin 2e-5) is still attacked and broken."""
    model, data = flip_data(tmp_path)
    with np.load(data) as d:
        x = torch.from_numpy(d["x"]).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        if model.cuda()(x).float().argmax(1)[FLIP].item() != 1:
            pytest.skip("this GPU's bf16 does not flip the constructed image")
    kw = dict(device="cuda", engine=engine)
    fp32 = run(model, **_kw(tmp_path, data, "g32", **kw))
    bf16 = run(model, **_kw(tmp_path, data, "g16", precision="bf16", **kw))
    a, b = _pe(tmp_path, "g32", fp32), _pe(tmp_path, "g16", bf16)
    assert a.clean_correct[FLIP] and not a.robust[FLIP] and not b.robust[FLIP]
    assert bf16.robust == fp32.robust and bf16.extra["fp32_rejected_successes"] == [0]
