"""Killed runs resume to the very same result; a changed configuration refuses to resume."""

import random
import signal
import time

import numpy as np
import pytest
import torch

from tests.support import helpers as h
from zoo.errors import BadInputError
from zoo.evaluate import cli, run
from zoo.evaluate.attacks.engine import AttackView
from zoo.evaluate.attacks.reference import ReferenceEngine
from zoo.evaluate.state import ShardState

ATTACKS = ["apgd-ce", "apgd-t"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return h.tiny_cnn_files(tmp_path_factory.mktemp("tiny"), 32, seed=2)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    folder = tmp_path_factory.mktemp("straight")
    model, _, data_file = tiny
    with h.one_thread():
        record = run(model, **_kwargs(folder, data_file, "straight", chunk_batches=3))
    return record, _outcome(record, folder / "results-straight")


def _kwargs(tmp_path, data_file, name, **extra):
    kw = dict(data=str(data_file), eps=h.TINY_EPS, version="custom", attacks=ATTACKS, batch_size=8,
              chunk_batches=1, device="cpu", results_dir=str(tmp_path / f"results-{name}"),
              run_dir=str(tmp_path / f"run-{name}"), model_label="tiny", progress=False)
    kw.update(extra)
    return kw


def _outcome(record, results_dir):
    pe = h.per_example(record, results_dir)
    return pe, [s.robust.correct for s in record.stages], record.clean.correct, record.robust.correct


def _assert_same(a, b):
    (pe_a, stages_a, clean_a, robust_a), (pe_b, stages_b, clean_b, robust_b) = a, b
    assert (stages_a, clean_a, robust_a) == (stages_b, clean_b, robust_b)
    for key in ("clean_correct", "robust", "broken_by", "adv_pred", "adv_positions", "x_adv"):
        assert np.array_equal(getattr(pe_a, key), getattr(pe_b, key)), key


def _wait_for_chunk(state_path, proc, timeout=120.0):
    """Until the subprocess has saved at least one chunk of attack batches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed:\n{proc.stderr.read()}")
        if state_path.exists():
            try:
                state = ShardState.load(state_path)
            except BadInputError:
                state = None
            if state is not None and (state.stage >= 1 or (state.stage == 0 and state.batches_done >= 1)):
                return
        time.sleep(0.05)
    raise AssertionError("no chunk was saved in time")


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, tiny, straight):
    model, model_path, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "killed")
    proc = h.python_subprocess(h.api_run_code(model_path, kw))
    state_path = tmp_path / "run-killed" / "shard-000-of-001.npz"
    try:
        _wait_for_chunk(state_path, proc)
        delay = random.uniform(0.0, 1.5)
        print(f"killing after a further {delay:.2f} s")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_state = ShardState.load(state_path)
    assert not killed_state.done, "the run finished before the kill; nothing was resumed"
    assert not (tmp_path / "results-killed").exists()

    resumed = run(model, **kw)
    assert resumed.config_hash == straight[0].config_hash   # chunking is not part of the configuration
    _assert_same(_outcome(resumed, tmp_path / "results-killed"), straight[1])
    resumed_pe = h.per_example(resumed, tmp_path / "results-killed")
    assert (resumed_pe.broken_by == 1).any()


def test_crash_in_second_stage_resumes_with_same_batches(tmp_path, tiny, straight, monkeypatch):
    model, _, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "crash")
    calls = {"apgd-t": 0}
    original = ReferenceEngine.attack_batch

    def crashing(self, attack, x, y):
        if attack == "apgd-t":
            calls["apgd-t"] += 1
            if calls["apgd-t"] == 2:
                raise KeyboardInterrupt("simulated crash")
        return original(self, attack, x, y)

    monkeypatch.setattr(ReferenceEngine, "attack_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(model, **kw)
    state = ShardState.load(tmp_path / "run-crash" / "shard-000-of-001.npz")
    assert (state.stage, state.batches_done) == (1, 1)
    monkeypatch.setattr(ReferenceEngine, "attack_batch", original)
    resumed = run(model, **kw)
    _assert_same(_outcome(resumed, tmp_path / "results-crash"), straight[1])


def test_rerunning_a_finished_run_returns_the_same_record_without_attacking(tmp_path, tiny, monkeypatch):
    model, _, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "twice", attacks=["apgd-ce"], n_ex=8)
    first = run(model, **kw)

    def no_attacks(*args, **kwargs):
        raise AssertionError("a finished run attacked again")

    monkeypatch.setattr(ReferenceEngine, "attack_batch", no_attacks)
    second = run(model, **kw)
    assert second.run_id == first.run_id
    assert second.robust == first.robust and second.stages == first.stages


def test_changed_configuration_refuses_to_resume(tmp_path, tiny):
    model, _, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "cfg", attacks=["apgd-ce"], n_ex=4)
    run(model, **kw)
    with pytest.raises(BadInputError, match=r"different evaluation \(differs in: seed\)") as info:
        run(model, **{**kw, "seed": 1})
    assert "refusing to resume" in str(info.value)
    with pytest.raises(BadInputError, match=r"differs in: batch_size"):
        run(model, **{**kw, "batch_size": 2})
    other = h.train_tiny_cnn()
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(BadInputError, match=r"differs in: checkpoint_sha256, weights_sha256"):
        run(other, **kw)


def test_corrupt_state_file_is_reported_with_a_fix(tmp_path, tiny):
    model, _, data_file = tiny
    kw = _kwargs(tmp_path, data_file, "corrupt", attacks=["apgd-ce"], n_ex=4)
    run(model, **kw)
    state_path = tmp_path / "run-corrupt" / "shard-000-of-001.npz"
    state_path.write_bytes(state_path.read_bytes()[:100])
    with pytest.raises(BadInputError, match="unreadable") as info:
        run(model, **kw)
    assert f"delete {state_path}" in str(info.value)


def test_replay_restores_attack_settings_changed_by_earlier_stages():
    """pyautoattack's loop leaves fab.n_restarts = 1 after FAB-T; a resumed 'fab' stage must see that too."""
    engine = ReferenceEngine(AttackView(h.TinyCNN()), norm="Linf", eps=0.01, version="plus", attacks=None, seed=0,
                             device="cpu")
    assert engine.attacks == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    assert engine.autoattack.fab.n_restarts == 5
    engine.replay(["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"])
    aa = engine.autoattack
    assert (aa.fab.n_restarts, aa.fab.targeted, aa.apgd.loss) == (1, True, "dlr")


def test_cli_resume_uses_saved_invocation_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    h.use_registry(monkeypatch, h.tiny_registry(tmp_path))
    ckpt = h.tiny_wrn_checkpoint(tmp_path)
    x, y = h.synthetic_images(4, seed=5)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    run_dir, results = tmp_path / "run", tmp_path / "results"
    argv = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file), "--attacks",
            "apgd-ce", "--batch-size", "2", "--device", "cpu", "--results-dir", str(results), "--run-dir",
            str(run_dir), "--no-progress"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: the run still resumes on cpu
    assert cli.main(["--resume", str(run_dir)]) == 0
    assert capsys.readouterr().out == first
    assert cli.main(["--resume", str(run_dir), "--eps", "4/255"]) == 2
    err = capsys.readouterr().err
    assert "differs in: eps" in err and "refusing to resume" in err
