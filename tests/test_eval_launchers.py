"""The real launchers, end to end on this machine: a two-node torchrun (c10d rendezvous on 127.0.0.1) and
submitit's LocalExecutor running --slurm's job functions. Each merges into one record equal to a
single-process run of the same split."""

import socket
import sys
import time

import numpy as np
import pytest

from tests.support import helpers as h
from zoo.evaluate import run
from zoo.evaluate.record import RunRecord

ATTACKS = "apgd-ce,apgd-t"
FACTORY = "tests.support.helpers:TinyCNN"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch")
    _, ckpt, data = h.tiny_cnn_files(folder, 12, seed=11)
    return folder, ckpt, data


def _cli_args(folder, ckpt, data, name):
    return ["--model-factory", FACTORY, "--checkpoint", str(ckpt), "--data", str(data), "--eps", str(h.TINY_EPS),
            "--attacks", ATTACKS, "--batch-size", "4", "--chunk-batches", "1", "--device", "cpu",
            "--results-dir", str(folder / f"results-{name}"), "--run-dir", str(folder / f"run-{name}"),
            "--model-label", "tiny", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def single(tiny):
    """The same configuration in this process: shard 0/2 then 1/2 (the second writes the record)."""
    folder, ckpt, data = tiny
    model = h.tiny_cnn_from(ckpt)
    kw = dict(data=str(data), eps=h.TINY_EPS, version="custom", attacks=ATTACKS.split(","), batch_size=4,
              chunk_batches=1, device="cpu", results_dir=str(folder / "results-single"),
              run_dir=str(folder / "run-single"), model_label="tiny", progress=False, threads=1)
    assert run(model, **kw, shard=(0, 2)) is None
    record = run(model, **kw, shard=(1, 2))
    return record, h.per_example(record, folder / "results-single")


def _only_record(results_dir):
    found = list(results_dir.rglob("*.json"))
    assert len(found) == 1, found
    record = RunRecord.read(found[0])
    return record, h.per_example(record, results_dir)


def _same_result(got, single):
    (rec, pe), (ref, ref_pe) = got, single
    assert (rec.clean, rec.robust, [s.robust for s in rec.stages]) == \
        (ref.clean, ref.robust, [s.robust for s in ref.stages])
    for key in ("clean_correct", "robust", "broken_by", "adv_positions", "x_adv"):
        assert np.array_equal(getattr(pe, key), getattr(ref_pe, key)), key
    assert rec.extra["shards"] == 2 and rec.extra["threads"] == 1
    assert (pe.broken_by >= 0).any()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_rendezvous_on_localhost(tiny, single):
    """Two torchrun launchers (nnodes 2, one process each, c10d rendezvous on 127.0.0.1, one thread each):
    ranks 0 and 1 each run their shard, rank 0 waits for rank 1's and writes the one record."""
    folder, ckpt, data = tiny
    port = _free_port()
    launchers = []
    for node in (0, 1):
        launchers.append(h.python_subprocess(
            "import sys; from torch.distributed.run import main; sys.exit(main())",
            env={"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}, args_after=[
                "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"zoo-test-{port}", "--node-rank", str(node),
                "--max-restarts", "0", "-m", "zoo.evaluate", *_cli_args(folder, ckpt, data, "torchrun")]))
    outputs = [p.communicate(timeout=300) for p in launchers]
    for p, (out, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    assert sorted(p.name for p in (folder / "run-torchrun").glob("shard-*")) == \
        ["shard-000-of-002.npz", "shard-001-of-002.npz"]
    _same_result(_only_record(folder / "results-torchrun"), single)


def test_slurm_job_functions_through_submitits_local_executor(tiny, single, tmp_path):
    """--slurm --shards 2 with submitit's real LocalExecutor (hidden --slurm-cluster local): the SlurmTask
    job functions run zoo-eval --shard I/2 in two processes; the last one writes the record."""
    pytest.importorskip("submitit", reason="submitit is the [slurm] extra (pip install 'score-zoo[slurm]')")
    folder, ckpt, data = tiny
    logs = tmp_path / "logs"
    code = h.python_subprocess(
        "import sys; from zoo.evaluate.cli import main; sys.exit(main(sys.argv[1:]))",
        args_after=[*_cli_args(folder, ckpt, data, "slurm"), "--slurm", "--shards", "2", "--slurm-gpus", "0",
                    "--slurm-cluster", "local", "--slurm-log-dir", str(logs)])
    out, err = code.communicate(timeout=120)
    assert code.returncode == 0, err
    assert "submitted 2 Slurm task(s)" in out
    deadline = time.monotonic() + 300
    results = folder / "results-slurm"
    while time.monotonic() < deadline and not list(results.rglob("*.json")):
        time.sleep(1)
    time.sleep(1)   # the record's .npz is written before its JSON
    assert list(results.rglob("*.json")), f"no record; task logs: {[p.name for p in logs.rglob('*')]}\n" + \
        "\n".join(p.read_text()[-2000:] for p in logs.rglob("*.err"))
    _same_result(_only_record(results), single)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
