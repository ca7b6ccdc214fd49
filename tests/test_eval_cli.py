"""zoo-eval on bad input: one clear message naming the problem and the fix, exit 2, nothing written."""

import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from tests.support import helpers as h
from zoo.errors import BadInputError
from zoo.evaluate import cli, plan, run


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Tiny registry model + checkpoint + 6 images it classifies correctly; cache and results in tmp."""
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    ckpt, data_file, x, y = h.tiny_registry_inputs(tmp_path, monkeypatch)
    results = tmp_path / "results"
    base = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file), "--attacks",
            "apgd-ce", "--eps", "1/255", "--batch-size", "3", "--device", "cpu", "--results-dir", str(results),
            "--no-progress"]
    return types.SimpleNamespace(tmp=tmp_path, ckpt=ckpt, data=data_file, results=results, base=base, x=x, y=y)


def _with(base, **flags):
    """base argv with some flags replaced (None removes the flag)."""
    out, skip = [], False
    names = {"--" + k.replace("_", "-"): v for k, v in flags.items()}
    for i, item in enumerate(base):
        if skip:
            skip = False
            continue
        if item in names:
            skip = not item.startswith("--no-")
            continue
        out.append(item)
    for name, value in names.items():
        if value is not None:
            out.append(f"{name}={value}")  # '=' form: argparse would read '-8/255' as an option
    return out


def _fails(env, capsys, argv, *needles):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not env.results.exists(), "something was written to the results folder"
    assert not (env.tmp / "cache" / "runs").exists(), "a run folder was created"
    return err


def test_successful_run_writes_record_and_summary(env, capsys):
    assert cli.main(env.base) == 0
    out = capsys.readouterr().out
    assert "clean      100.00%  (6/6, 95% CI 54.07-100.00)" in out and "apgd-ce" in out
    records = list(env.results.rglob("*.json"))
    assert len(records) == 1 and records[0].parent.parts[-3:] == ("custom", "linf", h.TINY_REGISTRY_MODEL)
    assert records[0].with_suffix(".npz").exists()
    from zoo.evaluate.record import RunRecord
    record = RunRecord.read(records[0])
    assert record.checkpoint["source"] == "local file" and record.checkpoint["sha256"]
    assert record.eps == "1/255" and record.version == "custom" and record.engine.startswith("reference ")


def test_unknown_model(env, capsys):
    _fails(env, capsys, _with(env.base, model="tiny-wrm"), "unknown model 'tiny-wrm'", "did you mean tiny-wrn")


def test_unknown_threat(env, capsys):
    _fails(env, capsys, _with(env.base, threat="linf2"), "invalid choice: 'linf2'")
    with pytest.raises(BadInputError, match="unknown threat 'linf2'"):
        run(h.TINY_REGISTRY_MODEL, threat="linf2", results_dir=env.results)


@pytest.mark.parametrize("eps,needle", [("0", "eps must be positive"), ("-8/255", "eps must be positive"),
                                        ("abc", "cannot parse eps 'abc'"), ("1/0", "cannot parse eps '1/0'"),
                                        ("nan", "cannot parse eps 'nan'")])
def test_bad_eps(env, capsys, eps, needle):
    _fails(env, capsys, _with(env.base, eps=eps), needle)


def test_n_ex_larger_than_the_data(env, capsys):
    _fails(env, capsys, _with(env.base, n_ex=100), "--n-ex 100 is larger than data file", "which has 6 images",
           "pass --n-ex 6 or less")


@pytest.mark.parametrize("arrays,needle", [
    ({"x": np.zeros((2, 3, 4, 4), np.float32)}, "has no array(s) ['y']"),
    ({"x": np.full((2, 3, 4, 4), 2.0, np.float32), "y": np.zeros(2, np.int64)}, "must lie in [0, 1]"),
    ({"x": np.zeros((2, 3, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "uint8 images must be NHWC"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(3, np.int64)}, "x has 2 images, y has shape (3,)"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(2, np.float32)}, "y must hold integer class labels"),
    ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.array([0, 12])}, "1 label(s) in the data are >= 10"),
    ({"x": np.full((2, 3, 32, 32), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "contains NaN"),
    ({"x": np.zeros((2, 32, 32), np.float32), "y": np.zeros(2, np.int64)}, "x must be 4-dimensional"),
])
def test_malformed_data_file(env, capsys, arrays, needle):
    bad = env.tmp / "bad.npz"
    np.savez(bad, **arrays)
    _fails(env, capsys, _with(env.base, data=bad), needle)


def test_data_file_that_is_not_npz(env, capsys):
    bad = env.tmp / "bad.npz"
    bad.write_text("hello")
    _fails(env, capsys, _with(env.base, data=bad), "is not a readable .npz", "np.savez(path, x=images, y=labels)")
    _fails(env, capsys, _with(env.base, data=env.tmp / "missing.npz"), "does not exist")


def test_model_with_nan_output(env, capsys):
    ckpt = h.tiny_wrn_checkpoint(env.tmp, nan=True)
    _fails(env, capsys, _with(env.base, checkpoint=ckpt), "NaN or infinite logits", "checkpoint is broken")


def test_checkpoint_for_another_number_of_classes(env, capsys):
    err = _fails(env, capsys, _with(env.base, dataset="cifar100"), "logits.weight")
    assert "zoo-eval: error:" in err


class _FakeCIFAR10:
    """torchvision.datasets.CIFAR10 stand-in: 10000 blank images, or a failing download."""

    fail_download = None

    def __init__(self, root, train, download):
        if not download:
            raise RuntimeError("Dataset not found or corrupted.")
        if self.fail_download:
            raise self.fail_download
        self.data = np.zeros((10000, 32, 32, 3), np.uint8)
        self.targets = [i % 10 for i in range(10000)]


@pytest.fixture
def fake_cifar(monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    monkeypatch.setattr(_FakeCIFAR10, "fail_download", None)
    return _FakeCIFAR10


def test_model_output_of_the_wrong_width(env, fake_cifar, tmp_path):
    class SevenWay(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :7]

    with pytest.raises(BadInputError, match="the model outputs 7 logits, but cifar10 has 10 classes"):
        run(SevenWay(), dataset="cifar10", n_ex=4, results_dir=env.results, device="cpu", data_dir=tmp_path)

    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10], x

    with pytest.raises(BadInputError, match=r"expected a logits tensor of shape \(4, num_classes\)"):
        run(Pair(), dataset="cifar10", n_ex=4, results_dir=env.results, device="cpu", data_dir=tmp_path)
    assert not env.results.exists()


def test_cifar_n_ex_and_download_failures(env, fake_cifar, capsys, monkeypatch):
    no_data = _with(env.base, data=None, data_dir=env.tmp / "cifar")
    _fails(env, capsys, _with(no_data, n_ex=20000), "--n-ex 20000 is larger than the cifar10 test set")
    fake_cifar.fail_download = urllib.error.URLError("Name or service not known")
    _fails(env, capsys, no_data, "could not download the cifar10 test set", "cifar-10-python.tar.gz",
           "--data FILE.npz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(env, capsys, no_data, "offline mode is on", "cifar-10-batches-py")


def test_cifar_through_torchvision(env, fake_cifar):
    record = run(h.train_tiny_cnn(), dataset="cifar10", n_ex=5, version="custom", attacks=["apgd-ce"],
                 results_dir=env.results, run_dir=env.tmp / "run", device="cpu", data_dir=env.tmp / "cifar",
                 model_label="tiny", progress=False)
    assert record.dataset == "cifar10" and record.indices == (0, 1, 2, 3, 4)
    assert record.data["source"] == "torchvision" and record.data["content_sha256"]
    assert record.eps == "8/255"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu(env, capsys):
    _fails(env, capsys, _with(env.base, device="cuda"), "asked for a GPU, but PyTorch sees none")
    _fails(env, capsys, _with(env.base, device="tpu"), "unknown device 'tpu'")


def test_gpu_precisions_refused_on_cpu(env, capsys, monkeypatch):
    from zoo.evaluate import cpus
    _fails(env, capsys, _with(env.base, precision="tf32"), "precision tf32 needs a GPU")
    monkeypatch.setattr(cpus, "native_bf16", lambda: None)   # a CPU without AMX/AVX512-BF16
    _fails(env, capsys, _with(env.base, precision="bf16"), "would emulate it")


def test_unwritable_results_folder(env, capsys):
    blocker = env.tmp / "file"
    blocker.write_text("x")
    code = cli.main(_with(env.base, results_dir=blocker / "results"))
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and "--results-dir" in err


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root ignores folder permissions")
def test_read_only_results_folder(env, capsys):
    ro = env.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = cli.main(_with(env.base, results_dir=ro / "results"))
    finally:
        ro.chmod(0o700)
    assert code == 2 and "is not writable" in capsys.readouterr().err


def test_attack_list_and_version_conflicts(env, capsys):
    _fails(env, capsys, env.base + ["--version", "standard"], "an attack list was given with version 'standard'",
           "--version custom")
    _fails(env, capsys, _with(env.base, attacks="apgd-ce,pgd"), "unknown attack(s) ['pgd']")
    _fails(env, capsys, _with(env.base, attacks=None) + ["--version", "custom"],
           "version 'custom' needs an attack list")


def test_bad_shards(env, capsys):
    _fails(env, capsys, _with(env.base, shard="2/2"), "need 0 <= I < K")
    _fails(env, capsys, _with(env.base, shard="0/10"), "10 shards for 6 examples")


def test_no_model(env, capsys):
    code = cli.main(["--threat", "linf"])
    assert code == 2 and "no model given" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_no_run(env, capsys):
    (env.tmp / "empty").mkdir()
    code = cli.main(["--resume", str(env.tmp / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a zoo-eval run folder (no config.json)" in err


def test_dry_run_prints_plan_and_writes_nothing(env, capsys):
    code = cli.main(_with(env.base, attacks=None, batch_size=None) + ["--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("apgd-ce", "apgd-t", "fab-t", "square", "GMACs per image", "batch size 250,",
                   "estimated time", "TMACs"):
        assert needle in out, needle
    assert not env.results.exists() and not (env.tmp / "cache" / "runs").exists()
    p = plan(h.TINY_REGISTRY_MODEL, checkpoint=env.ckpt, data=env.data, eps="1/255", device="cpu",
             results_dir=env.results)
    rows = {r["stage"]: (r["forward"], r["backward"]) for r in p.estimate.rows}
    # pyautoattack's standard Linf settings: APGD 100 iterations x 1 restart; APGD-T 9 targets; Square 5000.
    assert rows["apgd-ce"] == (102, 101)
    assert rows["apgd-t"] == (1 + 9 * 102, 9 * 101)
    assert rows["fab-t"] == (1 + 9 * 202, 9 * 100)
    assert rows["square"] == (5002, 0)
    assert p.estimate.macs_per_image > 0


def test_slurm_without_submitit(env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    _fails(env, capsys, env.base + ["--slurm", "--shards", "2"], "--slurm needs submitit",
           "pip install 'score-zoo[slurm]'")


def test_slurm_submits_one_array_task_per_shard(env, capsys, monkeypatch):
    submitted = {}

    class Executor:
        def __init__(self, folder):
            submitted["folder"] = folder

        def update_parameters(self, **params):
            submitted["params"] = params

        def map_array(self, fn, argvs):
            submitted["argvs"] = list(argvs)
            submitted["fn"] = fn
            return [types.SimpleNamespace(job_id=f"42_{i}") for i in range(len(argvs))]

    fake = types.SimpleNamespace(AutoExecutor=Executor,
                                 helpers=types.SimpleNamespace(DelayedSubmission=lambda fn, *a: ("delayed", fn, a)))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    argv = env.base + ["--slurm", "--shards", "3", "--slurm-partition", "gpu", "--slurm-time=30"]
    assert cli.main(argv) == 0
    assert "42_0, 42_1, 42_2" in capsys.readouterr().out
    assert submitted["params"]["slurm_partition"] == "gpu" and submitted["params"]["timeout_min"] == 30
    assert [a[-3:] for a in submitted["argvs"]] == [["--shard", f"{i}/3", "--no-progress"] for i in range(3)]
    assert all("--slurm" not in a and "--shards" not in a and "gpu" not in a for a in submitted["argvs"])
    assert submitted["fn"].checkpoint(["x"]) == ("delayed", submitted["fn"], (["x"],))  # requeue = resume


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "zoo.evaluate", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--resume RUN_DIR" in out.stdout and "zoo-eval merge RUN_DIR" in out.stdout


def test_suite_paper_runs_each_table_evaluation_with_the_shared_flags(monkeypatch, capsys):
    from zoo.evaluate import runner
    from zoo.evaluate.report.paper_table import paper_suite

    calls = []
    monkeypatch.setattr(runner, "run", lambda model, **kw: calls.append((model, kw)))
    assert cli.main(["--suite", "paper", "--n-ex", "500", "--device", "cpu", "--seed", "3", "--no-progress"]) == 0
    assert [(m, kw["dataset"], kw["threat"], kw["eps"]) for m, kw in calls] == [tuple(e) for e in paper_suite()]
    assert len(calls) == 4 and all(kw["n_ex"] == 500 and kw["seed"] == 3 and kw["device"] == "cpu" for _, kw in calls)
    assert {m for m, _ in calls} == {"score-wrn-28-10", "score-wrn-70-16"}


def test_suite_paper_refuses_per_model_flags(capsys):
    assert cli.main(["--suite", "paper", "--model", "score-wrn-28-10", "--eps", "4/255"]) == 2
    assert "drop --model, --eps" in capsys.readouterr().err
    assert cli.main(["--suite", "paper", "--checkpoint", "x.pt"]) == 2
    assert "zoo download" in capsys.readouterr().err


def test_dry_run_needs_neither_data_nor_weights(tmp_path, monkeypatch, capsys):
    """Offline, nothing cached: the plan still comes (the architecture with untrained weights, the count)."""
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["--model", "score-wrn-28-10", "--n-ex", "100", "--device", "cpu", "--dry-run",
                     "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0, out
    for needle in ("score-wrn-28-10 (36.48M parameters, 5.243 GMACs per image)", "planning needs no weights",
                   "not read: planning needs only the count", "examples 0..99 (100)", "chosen at the start",
                   "estimated time"):
        assert needle in out, needle
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()
