"""``--threat corruptions``: accuracy on CIFAR-10-C / CIFAR-100-C as RobustBench's ``benchmark()`` measures it.

RobustBench (``eval.py`` ``corruptions_evaluation``) evaluates, for each of the 15 corruptions and severities
1-5, the first ``n_examples`` images of that set (clean accuracy, in fp32), and reports ``corruptions_acc`` =
the mean of the 75 accuracies. We do the same, in batches of ``--batch-size``, saving each shard's progress
after every ``--chunk-batches`` batches (a killed run resumes there), sharded over the examples like the attack
runs (``--shard I/K``, torchrun); the record holds every (corruption, severity) accuracy. The clean accuracy of
the record is on the clean test set (``--data`` / ``--data-dir``), the first n images, as RobustBench's
``clean_acc``. Data: ``corruptions_data``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.errors import BadInputError, DataError, RecordError, RunStateError
from zoo.fileio import atomic_write_bytes, remove_stale_temp_files

from . import data as data_mod
from . import devices
from . import integrity, runlock
from .progress import StageProgress
from .corruptions_data import CORRUPTIONS, SEVERITIES, CorruptionSets, locate
from .options import RunOptions, hashed_values
from .prepare import (_absolute, _check_choice, _check_outputs, _check_writable, _load_model, _positive_int,
                      _prepare_model, _registry_variant, _resolve_device, _resolve_shard, check_label,
                      checkpoint_identity, invocation_of, library_versions, run_folder)
from .record import Accuracy, RunRecord
from .runner import _write_record, fp32_predictions
from .sharding import DistributedEnv, distributed_env, shard_bounds, unfinished_shards, wait_for_shards
from .state import config_hash, start_run_folder

log = logging.getLogger("zoo.evaluate")
THREAT = "corruptions"
N_SETS = len(CORRUPTIONS) * len(SEVERITIES)
STATE_KIND = "corruptions-shard"


@dataclass(frozen=True)
class CorruptionsSetup:
    opts: RunOptions
    model: nn.Module
    label: str
    model_kind: str
    checkpoint: dict[str, Any]
    clean: data_mod.EvalData
    sets: CorruptionSets
    n: int
    device: torch.device
    shard: tuple[int, int]
    dist: DistributedEnv | None
    invocation: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    run_dir: Path

    @property
    def is_rank0(self) -> bool:
        return self.dist is None or self.dist.rank == 0


def prepare(model_or_name: Any, options: RunOptions) -> CorruptionsSetup:
    """Checks (cheap ones first), the data (downloaded when missing), the model; nothing is written."""
    o = options
    _check_choice(o.dataset, ("cifar10", "cifar100"), "dataset for corruptions")
    for name, given in (("eps", o.eps), ("attacks", o.attacks), ("torch_compile", o.torch_compile)):
        if given is not None:
            raise BadInputError(f"--{name.replace('_', '-')} does not apply to --threat corruptions "
                                "(fixed corrupted test sets, no attack)", hint=f"drop --{name.replace('_', '-')}")
    if o.version != "standard" or o.engine != "reference" or o.precision != "fp32":
        raise BadInputError("--version, --engine and --precision do not apply to --threat corruptions "
                            "(an fp32 forward pass per image)", hint="drop them")
    batch_size = _positive_int(o.batch_size, "batch size")
    _positive_int(o.chunk_batches, "chunk size")
    dist = distributed_env()
    shard = _resolve_shard(o.shard, dist)
    dev = _resolve_device(o.device, dist)
    results_dir = Path(o.results_dir).expanduser()
    _check_writable(results_dir)
    if o.model_label is not None:
        check_label(o.model_label)
    if o.trained_threat is not None:
        from zoo.domain import NORM_THREATS
        _check_choice(o.trained_threat, NORM_THREATS, "trained threat")
    variant = _registry_variant(model_or_name, o.dataset, THREAT, o.checkpoint, o.trained_threat)

    sets = locate(o.dataset, o.data_root, o.data_dir, progress=bool(o.progress))
    n = sets.per_severity if o.n_ex is None else _positive_int(o.n_ex, "--n-ex")
    if n > sets.per_severity:
        raise BadInputError(f"--n-ex {n}: the corrupted sets hold {sets.per_severity} images per severity",
                            hint=f"use --n-ex {sets.per_severity} or fewer")
    clean = data_mod.load(o.dataset, n, o.data, o.data_dir, None)
    if len(clean) != n or not np.array_equal(clean.y.numpy(), sets.labels[:n]):
        raise DataError(f"the clean test images ({clean.source.get('path')}) do not carry the labels of the "
                        f"corrupted sets ({sets.folder / 'labels.npy'})",
                        hint="use the clean test set the corrupted sets were made from (--data or --data-dir)")
    shard_bounds(n, shard[1])
    model, label, kind, ckpt, _ = _load_model(model_or_name, variant, o.dataset, THREAT, o.checkpoint,
                                              o.model_label)
    model = _prepare_model(model, dev, False)
    num_classes = _check_outputs(model, clean, dev)
    data_mod.check_labels(clean, num_classes)
    resolved = dataclasses.replace(
        o, threat=THREAT, n_ex=n, data=_absolute(o.data), data_dir=_absolute(o.data_dir),
        data_root=_absolute(o.data_root), trained_threat=variant.threat if variant else None,
        batch_size=batch_size, device=devices.kind(dev), results_dir=_absolute(results_dir),
        checkpoint=_absolute(o.checkpoint), channels_last=False, chunk_batches=int(o.chunk_batches),
        progress=True if o.progress is None else bool(o.progress))
    invocation = invocation_of(model_or_name, label, kind, resolved)
    libs = library_versions()
    config = {**hashed_values(resolved), "kind": THREAT, "model": label, **checkpoint_identity(ckpt),
              "dataset": o.dataset, "clean_sha256": clean.content_sha256, "n": n,
              "corruptions_sha256": _sets_sha256(sets, n), "corruptions": list(CORRUPTIONS),
              "shards": shard[1], "torch": libs["torch"], "score_zoo": libs["score-zoo"]}
    digest = config_hash(config)
    run_dir = run_folder(o.run_dir, digest)
    return CorruptionsSetup(opts=resolved, model=model, label=label, model_kind=kind, checkpoint=ckpt, clean=clean,
                            sets=sets, n=n, device=dev, shard=shard, dist=dist, invocation=invocation,
                            config=config, config_hash=digest, run_dir=run_dir)


def _sets_sha256(sets: CorruptionSets, n: int) -> str:
    """sha256 of exactly what the run reads: the labels and the first n images of all 75 sets."""
    import hashlib
    digest = hashlib.sha256(np.ascontiguousarray(sets.labels[:n]).tobytes())
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            digest.update(f"{corruption}/{severity}|".encode())
            digest.update(np.ascontiguousarray(sets.mapped(corruption, severity, 0, n)))   # no copy: C order
    return digest.hexdigest()


# ---------------------------------------------------------------- shard state


def state_file_name(index: int, count: int) -> str:
    return f"corruptions-{index:03d}-of-{count:03d}.npz"


def state_path(run_dir: Path, index: int, count: int) -> Path:
    return Path(run_dir) / state_file_name(index, count)


@dataclass
class State:
    """One shard's progress: the clean pass, then set after set (corruption-major, severity 1..5), ``pos``
    examples into the current set. ``correct[s, i]``: example i of the shard right on set s."""

    config_hash: str
    bounds: tuple[int, int]
    clean_correct: np.ndarray | None
    next_set: int
    pos: int
    correct: np.ndarray
    seconds: float = 0.0

    @classmethod
    def new(cls, digest: str, bounds: tuple[int, int]) -> "State":
        m = bounds[1] - bounds[0]
        return cls(digest, bounds, None, 0, 0, np.zeros((N_SETS, m), dtype=bool))

    @property
    def done(self) -> bool:
        return self.clean_correct is not None and self.next_set >= N_SETS

    def save(self, path: Path) -> None:
        meta = {"kind": STATE_KIND, "config_hash": self.config_hash, "bounds": list(self.bounds),
                "next_set": self.next_set, "pos": self.pos, "seconds": self.seconds,
                "clean_done": self.clean_correct is not None}
        buffer = io.BytesIO()
        m = self.bounds[1] - self.bounds[0]
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), correct=self.correct,
                 clean_correct=self.clean_correct if self.clean_correct is not None else np.zeros(m, dtype=bool))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "State":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                correct, clean = z["correct"], z["clean_correct"]
        except (OSError, ValueError, KeyError) as exc:
            raise RunStateError(f"{path}: unreadable shard state ({exc})", hint=f"delete {path} to redo it") from None
        if meta.get("kind") != STATE_KIND or correct.shape != (N_SETS, meta["bounds"][1] - meta["bounds"][0]):
            raise RunStateError(f"{path}: not a corruptions shard state", hint=f"delete {path} to redo it")
        return cls(meta["config_hash"], tuple(meta["bounds"]), clean if meta["clean_done"] else None,
                   int(meta["next_set"]), int(meta["pos"]), correct, float(meta["seconds"]))


def set_of(flat: int) -> tuple[str, int]:
    """(corruption, severity) of set number ``flat`` (RobustBench's loop order)."""
    return CORRUPTIONS[flat // len(SEVERITIES)], SEVERITIES[flat % len(SEVERITIES)]


# ---------------------------------------------------------------- the loop


def _predict(setup: CorruptionsSetup, x: torch.Tensor) -> np.ndarray:
    B, dev = setup.opts.batch_size, setup.device
    with torch.no_grad():
        out = [fp32_predictions(setup.model, x[start:start + B].to(dev), dev).cpu() for start in range(0, len(x), B)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def _run_shard(setup: CorruptionsSetup, state: State, path: Path) -> None:
    lo, hi = state.bounds
    m = hi - lo
    step = setup.opts.batch_size * setup.opts.chunk_batches
    show = bool(setup.opts.progress) and setup.is_rank0
    if state.clean_correct is None:
        t0 = time.perf_counter()
        pred = _predict(setup, setup.clean.x[lo:hi])
        state.clean_correct = pred == setup.clean.y.numpy()[lo:hi]
        state.seconds += time.perf_counter() - t0
        state.save(path)
    labels = setup.sets.labels[lo:hi]
    done = state.next_set * m + state.pos
    bar = StageProgress(show, "corruptions", 0, 1, N_SETS * m, done, per_point=1, measure="accuracy")
    try:
        while state.next_set < N_SETS:
            corruption, severity = set_of(state.next_set)
            while state.pos < m:
                stop = min(state.pos + step, m)
                bar.start_chunk(stop - state.pos)
                t0 = time.perf_counter()
                images = setup.sets.images(corruption, severity, lo + state.pos, lo + stop)
                x = data_mod._from_uint8_nhwc(images)
                state.correct[state.next_set, state.pos:stop] = _predict(setup, x) == labels[state.pos:stop]
                state.seconds += time.perf_counter() - t0
                points = stop - state.pos
                state.pos = stop
                state.save(path)
                right = int(state.correct[:state.next_set].sum() + state.correct[state.next_set, :stop].sum())
                bar.end_chunk(points, right, state.next_set * m + stop)
            if show:
                acc = 100.0 * state.correct[state.next_set].mean() if m else 0.0
                log.info("%s severity %d: %.2f%% accuracy", corruption, severity, acc)
            state.next_set, state.pos = state.next_set + 1, 0
            state.save(path)
    finally:
        bar.close()


def _finalize(setup: CorruptionsSetup, doc: dict[str, Any]) -> RunRecord:
    k = setup.shard[1]
    clean, correct, seconds = [], [], 0.0
    for i, bounds in enumerate(shard_bounds(setup.n, k)):
        path = state_path(setup.run_dir, i, k)
        state = State.load(path)
        if state.config_hash != setup.config_hash or tuple(state.bounds) != tuple(bounds) or not state.done:
            raise RunStateError(f"{path} is unfinished or belongs to another configuration",
                                hint=f"delete {path} and run that shard again")
        clean.append(state.clean_correct)
        correct.append(state.correct)
        seconds += state.seconds
    clean_correct, all_correct = np.concatenate(clean), np.concatenate(correct, axis=1)
    n = setup.n
    per_set = all_correct.sum(axis=1)
    accuracies = {c: tuple(Accuracy(int(per_set[ci * 5 + s]), n) for s in range(5))
                  for ci, c in enumerate(CORRUPTIONS)}
    o = setup.opts
    record = RunRecord(
        run_id=doc["run_id"], model=setup.label, dataset=o.dataset, threat=THREAT, norm="", eps="", eps_value=0.0,
        version=THREAT, attacks=(), seed=o.seed, indices=tuple(range(n)),
        clean=Accuracy(int(clean_correct.sum()), n), robust=Accuracy(int(per_set.sum()), n * N_SETS), stages=(),
        engine="forward pass", precision="fp32", batch_size=o.batch_size, libraries=library_versions(),
        device=devices.name(setup.device),
        checkpoint={k_: setup.checkpoint.get(k_) for k_ in ("source", "sha256", "path", "weights_sha256",
                                                             "provenance")},
        data={**setup.clean.source, "corruptions_folder": str(setup.sets.folder),
              "corruptions_sha256": setup.config["corruptions_sha256"]},
        config_hash=setup.config_hash, created=doc["created"], complete=True, per_example_file=f"{doc['run_id']}.npz",
        extra={"shards": k, "seconds": round(seconds, 3), "model_dataset": o.dataset,
               "n_examples_semantics": "first n images of each (corruption, severity) set, as RobustBench",
               "run_dir": str(setup.run_dir.resolve())},
        kind=THREAT, trained_threat=o.trained_threat, corruptions=accuracies)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, indices=np.arange(n, dtype=np.int64), clean_correct=clean_correct,
                        correct=all_correct.reshape(len(CORRUPTIONS), len(SEVERITIES), n),
                        corruptions=np.array(CORRUPTIONS), config_hash=np.array(setup.config_hash))
    arrays = buffer.getvalue()
    record = dataclasses.replace(record, integrity=integrity.seal(arrays, setup.config, doc["invocation"]))
    record.validate()
    _write_record(Path(o.results_dir), setup.run_dir, record, arrays)
    return record


def read_per_example(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a corruptions record's .npz: correct (15, 5, n), clean_correct (n,), indices (n,)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("indices", "clean_correct", "correct", "corruptions")}
    except (OSError, ValueError, KeyError) as exc:
        raise RecordError(f"{path}: cannot read corruption arrays ({exc})") from None


# ---------------------------------------------------------------- public API


def run(model_or_name: nn.Module | str, options: RunOptions | None = None, /, **overrides: Any) -> RunRecord | None:
    """Evaluate on the 75 corrupted sets; same resuming and sharding contract as ``zoo.evaluate.run``."""
    setup = prepare(model_or_name, RunOptions.build(options, **{**overrides, "threat": THREAT}))
    doc = start_run_folder(setup.run_dir, setup.config, setup.config_hash, setup.invocation)
    with runlock.holding(setup.run_dir, setup.shard):   # one process per shard, as for attack runs
        remove_stale_temp_files(setup.run_dir)
        return _execute_locked(setup, doc)


def _execute_locked(setup: CorruptionsSetup, doc: dict[str, Any]) -> RunRecord | None:
    i, k = setup.shard
    bounds = shard_bounds(setup.n, k)[i]
    path = state_path(setup.run_dir, i, k)
    if path.exists():
        state = State.load(path)
        if state.config_hash != setup.config_hash or tuple(state.bounds) != tuple(bounds):
            raise RunStateError(f"{path} belongs to a different configuration or split",
                                hint=f"delete {path} to redo this shard")
        if not state.done and setup.is_rank0:
            log.info("resuming at set %d of %d, example %d", state.next_set + 1, N_SETS, state.pos)
    else:
        state = State.new(setup.config_hash, bounds)
    if setup.is_rank0:
        log.info("run folder %s (shard %d/%d: examples %d..%d)", setup.run_dir, i, k, bounds[0], bounds[1] - 1)
    if not state.done:
        _run_shard(setup, state, path)
    if k > 1:
        if setup.dist is not None:
            if setup.dist.rank != 0:
                return None
            wait_for_shards(setup.run_dir, k, name=state_file_name, finished=_finished)
        else:
            pending = unfinished_shards(setup.run_dir, k, state_file_name, _finished)
            if pending:
                log.info("shard %d/%d finished; still waiting for shard(s) %s (the last one writes the record, "
                         "or run `zoo-eval merge %s`)", i, k, pending, setup.run_dir)
                return None
    return _finalize(setup, doc)


def _finished(path: Path) -> bool:
    try:
        return path.exists() and State.load(path).done
    except RunStateError:
        return False


__all__ = ["run", "prepare", "read_per_example", "set_of"]
