"""The runner's GPU-only logic, run on the CPU: a fake CUDA device behind ``zoo.evaluate.devices``.

``devices`` owns every ``torch.cuda`` call and every "is this a GPU?" branch. The ``fake_cuda`` fixture
replaces those functions: ``cuda:N`` resolves to ``torch.device("cpu", N)``, which the fake reports as a
GPU, so prepare, the memory probe, the out-of-memory back-off, TF32/cuDNN switching, channels_last by
default, bf16 and torchrun-like ranks all take their GPU branches while the tensors stay on the CPU.
Real CUDA kernels are checked by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo.evaluate import devices, merge, precision, run, runner
from zoo.evaluate.attacks.native.engine import NativeEngine
from zoo.evaluate.attacks.reference import ReferenceEngine
from zoo.evaluate.options import RunOptions
from zoo.evaluate.prepare import prepare
from zoo.evaluate.sharding import wait_for_shards

from tests.support import helpers as h
from zoo.errors import BadInputError, ZooError

GIB = 1 << 30


class FakeCuda:
    """``count`` GPUs of ``total`` bytes; a forward+backward of b images on GPU i peaks at b * per_image[i]."""

    def __init__(self, monkeypatch, count: int = 2, total: int = 8 * GIB, per_image: dict[int, int] | None = None):
        self.count, self.total = count, total
        self.per_image = per_image or {}
        self.current: list[torch.device] = []
        self.last_batch = 0
        self.empty_cache_calls = 0
        m = monkeypatch
        m.setattr(devices, "available", lambda: True)
        m.setattr(devices, "count", lambda: self.count)
        m.setattr(devices, "gpu", lambda index: torch.device("cpu", index))
        m.setattr(devices, "is_gpu", lambda d: d.type == "cuda" or (d.type == "cpu" and d.index is not None))
        m.setattr(devices, "set_current", self.current.append)
        m.setattr(devices, "name", lambda d: f"cuda:{d.index} (Fake GPU)" if devices.is_gpu(d) else "cpu (host)")
        m.setattr(devices, "total_memory", lambda d: self.total)
        m.setattr(devices, "synchronize", lambda d: None)
        m.setattr(devices, "empty_cache", self._empty_cache)
        m.setattr(devices, "reset_peak_memory", lambda d: None)
        m.setattr(devices, "memory_allocated", lambda d: 0)
        m.setattr(devices, "max_memory_allocated", lambda d: self.last_batch * self.per_image.get(d.index, 1 << 20))

    def _empty_cache(self) -> None:
        self.empty_cache_calls += 1

    def watch(self, model: torch.nn.Module) -> torch.nn.Module:
        """Record each forward's batch size (what the fake's peak memory is computed from)."""
        model.register_forward_pre_hook(lambda module, args: setattr(self, "last_batch", args[0].shape[0]))
        return model


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


def _kw(tmp_path, data_file, name, **extra):
    kw = dict(data=data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], device="cuda",
              results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}", model_label="tiny",
              progress=False, batch_size=2)
    kw.update(extra)
    return kw


def _per_example(tmp_path, name, record):
    return h.per_example(record, tmp_path / f"results-{name}")


# ---------------------------------------------------------------- devices and the probe


def test_out_of_memory_is_recognised_whichever_library_reports_it():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert devices.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert devices.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert devices.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not devices.is_out_of_memory(RuntimeError("CUDNN_STATUS_BAD_PARAM"))
    assert not devices.is_out_of_memory(ValueError("out of memory"))


def test_the_probe_caps_the_device_batch_and_not_b(tmp_path, synthetic_data_file, fake_cuda):
    fake_cuda.per_image = {0: GIB}   # 4 images fill half of the 8 GiB card
    setup = prepare(fake_cuda.watch(h.train_tiny_cnn()), RunOptions.build(**_kw(tmp_path, synthetic_data_file, "p")))
    assert devices.is_gpu(setup.device) and setup.opts.device == "cuda"
    assert setup.device_batch == 4 and setup.opts.batch_size == 2
    assert setup.opts.channels_last is True   # the GPU default
    assert setup.config["batch_size"] == 2 and "device" not in setup.config and "channels_last" not in setup.config


def test_a_device_index_under_torchrun_is_refused_and_each_rank_takes_its_gpu(tmp_path, synthetic_data_file,
                                                                            fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(BadInputError, match="names one GPU, but torchrun started 2 processes") as info:
        prepare(h.train_tiny_cnn(), RunOptions.build(**_kw(tmp_path, synthetic_data_file, "i", device="cuda:0")))
    assert "--device cuda" in info.value.hint
    setup = prepare(h.train_tiny_cnn(), RunOptions.build(**_kw(tmp_path, synthetic_data_file, "i")))
    assert setup.device.index == 1 and fake_cuda.current == [setup.device]
    fake_cuda.count = 1   # more ranks than GPUs
    with pytest.raises(BadInputError, match="cuda:1 does not exist"):
        prepare(h.train_tiny_cnn(), RunOptions.build(**_kw(tmp_path, synthetic_data_file, "i")))


# ---------------------------------------------------------------- ranks agree; rank 0 does not hang


def _as_rank(monkeypatch, rank, world=2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def test_torchrun_ranks_with_different_probes_share_one_configuration(tmp_path, synthetic_data_file, fake_cuda,
                                                                      monkeypatch):
    """Two "GPUs" of different sizes probe different device caps; the ranks still run one configuration in
    one run folder (the default one, keyed by the hash), and rank 0 merges."""
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    fake_cuda.per_image = {0: GIB, 1: 2 * GIB}
    kw = _kw(tmp_path, synthetic_data_file, "ranks", engine="native", run_dir=None)
    setups = []
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        setups.append(prepare(fake_cuda.watch(h.train_tiny_cnn()), RunOptions.build(**kw)))
    assert [s.device_batch for s in setups] == [4, 2]
    assert setups[0].config == setups[1].config and setups[0].config_hash == setups[1].config_hash
    assert setups[0].run_dir == setups[1].run_dir
    assert [s.shard for s in setups] == [(0, 2), (1, 2)]

    _as_rank(monkeypatch, 1)
    assert run(fake_cuda.watch(h.train_tiny_cnn()), **kw) is None   # rank 1 runs its shard and leaves
    _as_rank(monkeypatch, 0)
    record = run(fake_cuda.watch(h.train_tiny_cnn()), **kw)        # rank 0 runs its shard and merges
    assert record.extra["shards"] == 2 and record.device == "cuda:0 (Fake GPU)"
    assert record.config_hash == setups[0].config_hash


def test_rank_zero_gives_up_waiting_with_the_commands_that_finish_the_run(tmp_path, synthetic_data_file,
                                                                          fake_cuda, monkeypatch):
    monkeypatch.setenv("SCORE_ZOO_SHARD_TIMEOUT", "0.2")
    _as_rank(monkeypatch, 0)
    kw = _kw(tmp_path, synthetic_data_file, "hang", attacks=["apgd-ce"])
    with pytest.raises(BadInputError, match=r"shard\(s\) \[1\] of 2 did not finish within 0 s") as info:
        run(h.train_tiny_cnn(), **kw)
    run_dir = tmp_path / "run-hang"
    assert f"zoo-eval --resume {run_dir} --shard 1/2" in info.value.hint
    assert f"zoo-eval merge {run_dir}" in info.value.hint
    assert "SCORE_ZOO_SHARD_TIMEOUT" in info.value.hint
    # what the message says to do: the missing shard, as a plain --shard job (here on the CPU), finishes it
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    record = run(h.train_tiny_cnn(), **{**kw, "shard": "1/2", "device": "cpu"})
    assert record is not None and record.extra["shards"] == 2 and record.device == "cpu (host)"


def test_wait_for_shards_names_the_missing_shard_files(tmp_path):
    with pytest.raises(BadInputError, match="shard-000-of-002.npz, shard-001-of-002.npz"):
        wait_for_shards(tmp_path, 2, poll_seconds=0.01, timeout=0.05)


def test_a_bad_shard_timeout_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_ZOO_SHARD_TIMEOUT", "soon")
    with pytest.raises(BadInputError, match="SCORE_ZOO_SHARD_TIMEOUT"):
        wait_for_shards(tmp_path, 2)


# ---------------------------------------------------------------- precision switches on the "GPU"


def test_tf32_and_cudnn_switches_hold_during_the_attacks_and_are_restored(tmp_path, synthetic_data_file, fake_cuda,
                                                                        monkeypatch):
    b = torch.backends
    seen = []
    original = ReferenceEngine.attack_batch

    def attack_batch(self, attack, x, y):
        seen.append((b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark))
        return original(self, attack, x, y)

    monkeypatch.setattr(ReferenceEngine, "attack_batch", attack_batch)
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    try:
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = b.cudnn.benchmark = True   # what users often have
        b.cudnn.deterministic = False
        for prec in ("tf32", "fp32"):
            seen.clear()
            record = run(h.train_tiny_cnn(), **_kw(tmp_path, synthetic_data_file, prec, precision=prec,
                                                   attacks=["apgd-ce"]))
            on = prec == "tf32"
            assert seen and set(seen) == {(on, on, True, False)}
            assert record.extra["tf32"] == {"matmul": on, "cudnn": on}
            assert record.extra["cudnn"] == {"deterministic": True, "benchmark": False}
            assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark) == (
                True, True, False, True)
        with precision.precision_mode("fp32", torch.device("cpu")):   # a real CPU: nothing switched
            assert b.cudnn.allow_tf32 and not b.cudnn.deterministic
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = before


@pytest.mark.parametrize("engine", ["reference", "native"])
def test_channels_last_by_default_on_the_gpu_gives_the_cpu_flags(tmp_path, synthetic_data_file, fake_cuda, engine):
    model = h.train_tiny_cnn()
    gpu = run(model, **_kw(tmp_path, synthetic_data_file, "gpu", engine=engine))
    assert gpu.extra["channels_last"] is True and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    cpu = run(h.train_tiny_cnn(), **_kw(tmp_path, synthetic_data_file, "cpu", engine=engine, device="cpu"))
    assert cpu.extra["channels_last"] is False and cpu.extra["cudnn"] is None
    assert gpu.config_hash == cpu.config_hash   # neither the device nor its default layout is hashed
    for key in ("robust", "broken_by"):
        assert np.array_equal(getattr(_per_example(tmp_path, "gpu", gpu), key),
                              getattr(_per_example(tmp_path, "cpu", cpu), key)), key


def test_bf16_on_the_gpu_then_merged_on_the_cpu(tmp_path, synthetic_data_file, fake_cuda):
    """bf16 needs a GPU to attack, not to merge: shards made on a GPU merge on any device."""
    kw = _kw(tmp_path, synthetic_data_file, "bf16", engine="native", precision="bf16")
    for i in (0, 1):
        first = run(h.train_tiny_cnn(), **kw, shard=f"{i}/2")
    assert first.precision == "bf16" and first.device == "cuda:0 (Fake GPU)"
    assert len(first.extra["fp32_rejected_successes"]) == 2
    merged = merge(tmp_path / "run-bf16", model=h.train_tiny_cnn(), device="cpu",
                   results_dir=tmp_path / "results-merged")
    assert merged.config_hash == first.config_hash and merged.device == "cpu (host)"
    assert merged.robust == first.robust and merged.extra["cudnn"] is None
    from zoo.evaluate import cpus   # attacking on a CPU without native bf16 is still refused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpus, "native_bf16", lambda: None)
        with pytest.raises(BadInputError, match="precision bf16 needs a GPU or a CPU with native bf16"):
            run(h.train_tiny_cnn(), **{**kw, "device": "cpu", "run_dir": tmp_path / "other"})


# ---------------------------------------------------------------- out of memory on the "GPU"


def _native_fails_above(limit, monkeypatch, error):
    seen = []
    original = NativeEngine._run_native

    def run_native(self, attack, calls, x, y, layout):
        if len(x) > limit:
            seen.append((attack, len(x), "oom"))
            raise error
        seen.append((attack, len(x), "ok"))
        return original(self, attack, calls, x, y, layout)

    monkeypatch.setattr(NativeEngine, "_run_native", run_native)
    return seen


def _count_compiles(monkeypatch):
    calls, resets = [], []
    monkeypatch.setattr(runner, "compiled_for_attacks", lambda model, mode, *a: calls.append(mode) or model)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    return calls, resets


@pytest.mark.parametrize("torch_compile", [None, "default"])
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (simulated)")],
                         ids=["cuda-oom", "cudnn-alloc"])
def test_native_out_of_memory_on_the_gpu_shrinks_the_probed_cap(tmp_path, fake_cuda, monkeypatch, torch_compile,
                                                               error):
    x, y = h.synthetic_images(12, seed=2)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    fake_cuda.per_image = {0: GIB}   # probe: 12 -> 6 -> 3 points fit half the card
    seen = _native_fails_above(2, monkeypatch, error)
    compiles, resets = _count_compiles(monkeypatch)
    record = run(fake_cuda.watch(h.train_tiny_cnn()), **_kw(tmp_path, data_file, "oom", engine="native",
                                                            batch_size=1, torch_compile=torch_compile))
    assert record.batch_size == 1
    assert seen[0] == ("apgd-ce", 3, "oom")   # merged up to the probed cap first
    assert max(size for _, size, status in seen if status == "ok") == 1   # then halved: 3 // 2
    assert fake_cuda.empty_cache_calls >= 1
    if torch_compile is None:
        assert compiles == [None] and resets == []
    else:   # compiled graphs dropped and rebuilt for the retry
        assert compiles == ["default", "default"] and len(resets) == 1


@pytest.mark.parametrize("torch_compile", [None, "default"])
def test_reference_out_of_memory_on_the_gpu_says_what_to_pass(tmp_path, synthetic_data_file, fake_cuda,
                                                             monkeypatch, torch_compile):
    def attack_batch(self, attack, x, y):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(ReferenceEngine, "attack_batch", attack_batch)
    compiles, resets = _count_compiles(monkeypatch)
    with pytest.raises(ZooError, match="ran out of memory with batch size 2") as info:
        run(h.train_tiny_cnn(), **_kw(tmp_path, synthetic_data_file, "ref-oom", torch_compile=torch_compile))
    assert "--batch-size 1" in info.value.hint
    assert len(resets) == (0 if torch_compile is None else 1)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, synthetic_data_file, fake_cuda,
                                                              monkeypatch):
    def attack_batch(self, attack, x, y):
        raise RuntimeError("CUDNN_STATUS_BAD_PARAM")

    monkeypatch.setattr(ReferenceEngine, "attack_batch", attack_batch)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_BAD_PARAM"):
        run(h.train_tiny_cnn(), **_kw(tmp_path, synthetic_data_file, "bad"))


def test_the_estimate_times_a_realistic_batch_on_the_gpu(tmp_path, synthetic_data_file, fake_cuda, monkeypatch):
    """A GPU is timed at the batches the attacks will run (B within the probed cap), not at 16 images."""
    from zoo.evaluate import estimate, plan

    timed = []
    monkeypatch.setattr(estimate, "_time_passes", lambda model, shape, device, batch, prec: timed.append(batch)
                        or (1e-3, 2e-3))
    fake_cuda.per_image = {0: GIB}   # probe: 8 -> 4 points
    kw = _kw(tmp_path, synthetic_data_file, "plan", batch_size=250)
    plan(fake_cuda.watch(h.train_tiny_cnn()), **kw)
    plan(fake_cuda.watch(h.train_tiny_cnn()), **{**kw, "batch_size": 6})
    plan(h.train_tiny_cnn(), **{**kw, "device": "cpu"})
    assert timed == [4, 4, 8]   # min(B, cap, n) on the GPU; min(B, 16, n) with n = 8 on the CPU
