"""Shards: contiguous, balanced, merged by example; two processes equal the same split run in one."""

import shutil

import numpy as np
import pytest

from tests.support import helpers as h
from zoo.errors import BadInputError
from zoo.evaluate import cli, merge, run
from zoo.evaluate.sharding import parse_shard, shard_bounds, shard_path, unfinished_shards
from zoo.evaluate.state import ShardState

ATTACKS = ["apgd-ce", "apgd-t"]


@pytest.mark.parametrize("n,k", [(10, 1), (10, 3), (10000, 7), (5, 5), (24, 2)])
def test_shard_bounds_are_contiguous_balanced_and_complete(n, k):
    bounds = shard_bounds(n, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and sum(sizes) == n


def test_unfinished_shards_reads_missing_partial_corrupt_and_finished_files(tmp_path):
    def state(index, stage):
        st = ShardState.new("h" * 64, index, 4, np.arange(index * 2, index * 2 + 2), 2, (3, 2, 2))
        st.stage = stage
        return st

    state(0, 2).save(shard_path(tmp_path, 0, 4))          # finished (2 stages done)
    state(1, 1).save(shard_path(tmp_path, 1, 4))          # still in its second stage
    shard_path(tmp_path, 2, 4).write_bytes(b"PK\x03\x04 half a zip")   # mid-replacement / truncated
    assert unfinished_shards(tmp_path, 4) == [1, 2, 3]    # 3 does not exist yet
    assert ShardState.is_finished(shard_path(tmp_path, 0, 4))
    state(1, 2).save(shard_path(tmp_path, 1, 4))
    assert unfinished_shards(tmp_path, 4) == [2, 3]


def test_shard_bounds_and_parse_refuse_nonsense():
    with pytest.raises(BadInputError, match="leave some shards empty"):
        shard_bounds(3, 4)
    assert parse_shard(" 2/8 ") == (2, 8)
    for text in ("8/8", "1-4", "a/b", "-1/2"):
        with pytest.raises(BadInputError, match="--shard"):
            parse_shard(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return h.tiny_cnn_files(tmp_path_factory.mktemp("tiny"), 16, seed=7)


def _kwargs(folder, data_file, name, **extra):
    kw = dict(data=str(data_file), eps=h.TINY_EPS, version="custom", attacks=ATTACKS, batch_size=6, chunk_batches=1,
              device="cpu", results_dir=str(folder / f"results-{name}"), run_dir=str(folder / f"run-{name}"),
              model_label="tiny", progress=False)
    kw.update(extra)
    return kw


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """Shards 0/2 then 1/2 in this process: the second one finds both finished and writes the record."""
    folder = tmp_path_factory.mktemp("one")
    model, _, data_file = tiny
    with h.one_thread():
        assert run(model, **_kwargs(folder, data_file, "one", shard=(0, 2))) is None
        record = run(model, **_kwargs(folder, data_file, "one", shard="1/2"))
    assert record is not None and record.extra["shards"] == 2
    return folder, record


def test_two_torchrun_processes_merge_to_the_one_process_result(tmp_path, tiny, one_process):
    """torchrun --standalone --nproc-per-node 2 on CPU: each rank one shard, rank 0 waits and merges."""
    model, model_path, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "dist")
    script = tmp_path / "rank.py"
    script.write_text("import os\n" + h.api_run_code(model_path, kw).replace(
        "print('RECORD', ", "print('RANK', os.environ['RANK'], 'RECORD', "))
    proc = h.python_subprocess("import sys; from torch.distributed.run import main; sys.exit(main())", args_after=[
        "--standalone", "--nproc-per-node", "2", str(script)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "RANK 1 RECORD None" in out          # rank 1 only ran its shard
    assert "RANK 0 RECORD None" not in out and "RANK 0 RECORD" in out   # rank 0 waited for it and merged
    assert sorted(p.name for p in (tmp_path / "run-dist").glob("shard-*")) == \
        ["shard-000-of-002.npz", "shard-001-of-002.npz"]
    records = list((tmp_path / "results-dist").rglob("*.json"))
    assert len(records) == 1
    from zoo.evaluate.record import RunRecord
    dist = RunRecord.read(records[0])
    folder, single = one_process
    assert dist.config_hash == single.config_hash
    assert (dist.clean, dist.robust, [s.robust for s in dist.stages]) == \
        (single.clean, single.robust, [s.robust for s in single.stages])
    a, b = h.per_example(dist, tmp_path / "results-dist"), h.per_example(single, folder / "results-one")
    for key in ("clean_correct", "robust", "broken_by", "adv_positions", "x_adv"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert (a.broken_by >= 0).any()


def test_merge_refuses_missing_overlapping_and_foreign_shards(tmp_path, tiny, one_process):
    model, _, data_file = tiny
    folder, _ = one_process
    # incomplete: only shard 0 of 2
    run(model, **_kwargs(tmp_path, data_file, "half", shard=(0, 2)))
    with pytest.raises(BadInputError, match=r"8 of 16 examples are in no finished shard") as info:
        merge(tmp_path / "run-half", model=model)
    assert "run every shard of the split (K=2)" in str(info.value)
    # several splits: a finished 2-way split wins over an unfinished 3-way one; two unfinished ones refuse
    both = tmp_path / "run-both"
    shutil.copytree(folder / "run-one", both)
    shutil.copy(tmp_path / "run-half" / "shard-000-of-002.npz", both / "shard-000-of-003.npz")
    assert merge(both, model=model, results_dir=tmp_path / "r-both").robust == one_process[1].robust
    (both / "shard-001-of-002.npz").unlink()
    with pytest.raises(BadInputError, match=r"several splits \(K = \[2, 3\]\), none of them complete"):
        merge(both, model=model)
    # overlapping: two files of one split covering the same examples
    shutil.copy(both / "shard-000-of-002.npz", both / "shard-001-of-002.npz")
    (both / "shard-000-of-003.npz").unlink()
    with pytest.raises(BadInputError, match="overlapping shards"):
        merge(both, model=model)
    # foreign: a shard made with another seed
    run(model, **_kwargs(tmp_path, data_file, "seed1", shard=(1, 2), seed=1, attacks=["apgd-ce"]))
    mixed = tmp_path / "run-mixed"
    mixed.mkdir()
    shutil.copy(folder / "run-one" / "config.json", mixed)
    shutil.copy(folder / "run-one" / "shard-000-of-002.npz", mixed)
    shutil.copy(tmp_path / "run-seed1" / "shard-001-of-002.npz", mixed)
    with pytest.raises(BadInputError, match=r"shard-001-of-002.npz'\] in .* belong to a different configuration"):
        merge(mixed, model=model)


def test_merge_of_a_complete_run_rewrites_the_same_record(tmp_path, tiny, one_process):
    model, _, _ = tiny
    folder, single = one_process
    again = merge(folder / "run-one", model=model, results_dir=tmp_path / "remerged")
    assert again.run_id == single.run_id and again.to_dict()["stages"] == single.to_dict()["stages"]
    assert (tmp_path / "remerged" / single.relative_path()).exists()


def test_cli_merge_needs_the_module_for_python_runs(one_process, capsys):
    folder, _ = one_process
    assert cli.main(["merge", str(folder / "run-one")]) == 2
    err = capsys.readouterr().err
    assert "custom module (tiny)" in err and "zoo.evaluate.merge(run_dir, model=the_module)" in err


def test_cli_shards_then_merge_for_a_registry_model(tmp_path, monkeypatch, capsys):
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    base = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file), "--attacks",
            "apgd-ce", "--eps", "1/255", "--batch-size", "3", "--device", "cpu", "--results-dir",
            str(tmp_path / "results"), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(base + ["--shard", "1/2"]) == 0
    assert "this shard is finished" in capsys.readouterr().out
    assert cli.main(["merge", str(tmp_path / "run")]) == 2
    assert "3 of 6 examples are in no finished shard" in capsys.readouterr().err
    assert cli.main(base + ["--shard", "0/2"]) == 0
    out = capsys.readouterr().out
    assert "clean      100.00%  (6/6, 95% CI" in out and "record:" in out
    assert cli.main(["merge", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.splitlines()[:4] == out.splitlines()[:4]
