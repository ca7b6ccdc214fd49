"""Nothing half-written: a full disk leaves no orphan arrays and keeps the run; orphaned temp files are
cleaned on the next run (never a live writer's); a run folder worked on by one process refuses a second."""

import errno
import logging
import os
import subprocess
import time

import pytest

from tests.support import helpers as h
from zoo import fileio
from zoo.errors import RunStateError, ZooError
from zoo.evaluate import cli, record as record_mod, run, runlock, runner


@pytest.fixture(autouse=True)
def fresh_cli_logging(monkeypatch):
    """zoo-eval attaches its stderr handlers once per process: let each test's cli.main attach its own."""
    for name in ("zoo.evaluate", "auto-attack"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    results, run_dir = tmp_path / "results", tmp_path / "run"
    argv = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file), "--attacks",
            "apgd-ce", "--eps", "1/255", "--batch-size", "3", "--device", "cpu", "--results-dir", str(results),
            "--run-dir", str(run_dir), "--no-progress"]
    return results, run_dir, argv


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("failing, code", [("json", errno.ENOSPC), ("json", errno.EDQUOT), ("json", errno.EROFS),
                                           ("npz", errno.ENOSPC)])
def test_full_disk_leaves_no_half_record_and_rerun_writes_it(env, monkeypatch, capsys, failing, code):
    results, run_dir, argv = env
    # the JSON goes through the record module; the arrays are the sealed bytes the runner writes itself
    module, name = (record_mod, "atomic_write_text") if failing == "json" else (runner, "atomic_write_bytes")
    real = getattr(module, name)

    def full(path, data):
        if str(path).startswith(str(results)):
            raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(module, name, full)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write the record into" in err and str(results) in err and "re-run" in err
    assert "Traceback" not in err
    assert not [f for f in _files(results) if f.endswith((".npz", ".json"))], "half a record was left"
    assert any(f.startswith("shard-") for f in _files(run_dir)), "the run state was not kept"
    monkeypatch.setattr(module, name, real)
    assert cli.main(argv) == 0
    written = _files(results)
    assert sum(f.endswith(".json") for f in written) == 1 and sum(f.endswith(".npz") for f in written) == 1


def test_other_os_errors_stay_errors_and_leave_nothing(tmp_path, monkeypatch):
    model = h.train_tiny_cnn()
    x, y = h.synthetic_images(4, seed=1)
    data = h.write_npz(tmp_path / "d.npz", x, y)

    def broken(path, data):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(record_mod, "atomic_write_text", broken)
    with pytest.raises(OSError) as info, h.one_thread():
        run(model, data=str(data), eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"], batch_size=4,
            device="cpu", results_dir=str(tmp_path / "res"), run_dir=str(tmp_path / "run"), model_label="t",
            progress=False)
    assert not isinstance(info.value, ZooError)
    assert not [f for f in _files(tmp_path / "res") if f.endswith(".npz")]


def _age(path, seconds):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_temp_files_are_told_from_live_ones(tmp_path):
    me = fileio.temp_owner()
    pid, host = me.split("@")
    dead = 2 ** 22 + 12345     # above Linux's default pid_max
    files = {
        "dead-owner": f".r.json.{dead}@{host}.abc123.tmp",
        "live-owner-old": f".r.json.{pid}@{host}.def456.tmp",
        "other-host-fresh": ".r.json.1@elsewhere.ghi789.tmp",
        "other-host-old": ".r.json.1@elsewhere.jkl012.tmp",
        "unowned-fresh": ".r.json.mno345.tmp",
        "unowned-old": ".r.json.pqr678.tmp",
        "not-a-temp-file": "r.json",
    }
    for key, name in files.items():
        (tmp_path / name).write_text("x")
        if key.endswith("old"):
            _age(tmp_path / name, 2 * 3600)
    removed = {p.name for p in fileio.remove_stale_temp_files(tmp_path)}
    assert removed == {files[k] for k in ("dead-owner", "other-host-old", "unowned-old")}
    assert {p.name for p in tmp_path.iterdir()} == {files[k] for k in ("live-owner-old", "other-host-fresh",
                                                                      "unowned-fresh", "not-a-temp-file")}


def test_atomic_output_names_its_owner(tmp_path):
    with fileio.atomic_output(tmp_path / "x.json") as tmp:
        assert f".{fileio.temp_owner()}." in tmp.name
        assert fileio.stale_temp_files(tmp_path) == []   # a live writer's file is never stale


def test_next_run_cleans_orphans_in_run_and_results_folders(env, capsys):
    results, run_dir, argv = env
    assert cli.main(argv) == 0
    record_dir = next(results.rglob("*.json")).parent
    orphans = [run_dir / ".shard-000-of-001.npz.777.tmp", record_dir / ".x.json.888.tmp"]
    for p in orphans:
        p.write_text("half")
        _age(p, 2 * 3600)
    assert cli.main(argv) == 0    # resumes the finished run: rewrites the record
    assert not any(p.exists() for p in orphans)


def test_second_process_on_a_run_folder_stops_at_once(env, capsys):
    results, run_dir, argv = env
    run_dir.mkdir()
    holder = h.python_subprocess(
        "import sys\nfrom zoo.evaluate import runlock\n"
        f"with runlock.holding({str(run_dir)!r}):\n"
        "    print('LOCKED', flush=True)\n"
        "    sys.stdin.read()\n", stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "LOCKED", holder.stderr.read()
        started = time.monotonic()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - started < 60
        assert f"run folder {run_dir} is in use by process {holder.pid}@" in err
        assert not results.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert cli.main(argv) == 0     # the lock went with the process


def test_shards_lock_separately_and_the_lock_file_records_the_owner(tmp_path):
    with runlock.holding(tmp_path, (0, 2)):
        with runlock.holding(tmp_path, (1, 2)):
            pass
        with pytest.raises(RunStateError, match=r"\(shard 0/2\) is in use by process"):
            # flock locks are per open file: a second open in this process conflicts like another process
            with runlock.holding(tmp_path, (0, 2)):
                pass
        assert runlock.lock_path(tmp_path, (0, 2)).read_text().strip() == fileio.temp_owner()
