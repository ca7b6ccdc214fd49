"""The staged AutoAttack evaluation, made resumable, shardable and self-checking.

Schedule (identical to pyautoattack's ``run_standard_evaluation(x, y, batch_size=B)``): clean predictions
in batches of B; then for each attack the examples still robust at the start of the stage, sorted, cut into
consecutive batches of B, each attacked with the seed reset; an example is non-robust once the model's
prediction on the returned image differs from its label. The per-batch attack call goes to an engine
(``engine.py``). Work is saved after every chunk of batches, so a killed run resumes where it stopped with
the same batches, hence the same result.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.errors import BadInputError, RunStateError, ZooError
from zoo.fileio import atomic_write_bytes, remove_stale_temp_files, utc_timestamp

from . import checks, devices, integrity, runlock
from .attacks.compiled import compiled_for_attacks
from .attacks.engine import AttackView, engine_class
from .bf16 import fp32_second_chance
from .estimate import Plan, estimate, fmt_seconds, plan_text
from .options import RunOptions
from .precision import autocast_dtype, cudnn_in_effect, precision_mode, strict_fp32, tf32_in_effect
from .prepare import Setup, library_versions, prepare
from .progress import StageProgress
from .record import Accuracy, RunRecord, Stage, per_example_path
from .sharding import merge_states, shard_bounds, shard_path, unfinished_shards, wait_for_shards
from .state import CLEAN_STAGE, ShardState, config_differences, read_config, start_run_folder
from .verify import check_adversarial, verify_predictions

log = logging.getLogger("zoo.evaluate")


@dataclass
class Live:
    """What may change while a run goes on (``Setup`` does not): the cap on merged device batches, halved
    on out-of-memory, and the model the attacks call (compiled on first use, dropped on out-of-memory)."""

    device_batch: int | None
    attack_model: nn.Module | None = None


# ---------------------------------------------------------------- progress


# ---------------------------------------------------------------- the loop


def fp32_predictions(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The classes the model predicts for one device batch, in strict fp32 (every recorded flag comes from
    these, whatever precision the attacks ran in)."""
    with strict_fp32(device):
        return model(x).argmax(dim=1)


def _run_shard(setup: Setup, live: Live, state: ShardState, path: Path) -> None:
    o = setup.opts
    dev, B, K = setup.device, o.batch_size, o.chunk_batches
    positions = torch.from_numpy(state.positions)
    x_all = setup.data.x[positions].contiguous()
    y_all = setup.data.y[positions]
    n = len(state.positions)
    if live.attack_model is None:  # compiled here, not in prepare: plan() and merge() never attack
        with precision_mode(o.precision, dev):   # the TF32 setting is part of what gets compiled
            live.attack_model = compiled_for_attacks(setup.model, o.torch_compile, tuple(x_all.shape[1:]), dev,
                                                     autocast_dtype(o.precision))
    view = AttackView(live.attack_model, autocast_dtype(o.precision), fp32_model=setup.model)
    engine = setup.engine(view, live.device_batch)
    fp32_view = AttackView(setup.model) if o.precision == "bf16" else None   # for what bf16 misses (bf16.py)
    fp32_engine = None if fp32_view is None else setup.engine(fp32_view, live.device_batch, precision="fp32")
    if tuple(engine.attacks) != setup.attacks:
        raise RuntimeError(f"engine {o.engine} runs {list(engine.attacks)}, expected {list(setup.attacks)}")
    show = o.progress and setup.is_rank0
    with torch.no_grad(), precision_mode(o.precision, dev):
        if state.stage == CLEAN_STAGE:
            state.preflight = _measure(setup, engine, x_all[:B].to(dev), y_all[:B].to(dev))
            if setup.is_rank0:
                checks.warn(_preflight_checks(setup, [state.preflight]))
            t0 = time.perf_counter()
            pred = torch.empty(n, dtype=torch.int64)
            for start in range(0, n, B):
                pred[start:start + B] = fp32_predictions(setup.model, x_all[start:start + B].to(dev), dev).cpu()
            state.clean_pred = pred.numpy()
            state.clean_correct = (pred == y_all).numpy()
            state.robust = state.clean_correct.copy()
            state.stage_start_robust = state.robust.copy()
            state.stage, state.batches_done = 0, 0
            state.clean_seconds += time.perf_counter() - t0
            state.save(path)
            if show:
                log.info("clean: %d/%d correct (%.2f%%)", state.robust.sum(), n, 100.0 * state.robust.sum() / n)
        else:
            engine.replay(setup.attacks[: state.stage])
        while not state.done:
            s = state.stage
            attack = setup.attacks[s]
            plan = np.flatnonzero(state.stage_start_robust)
            if len(plan) == 0:  # the reference stops once nothing is robust
                state.stage, state.batches_done = state.n_stages, 0
                state.save(path)
                break
            batches = [plan[i:i + B] for i in range(0, len(plan), B)]
            done = sum(len(b) for b in batches[:state.batches_done])
            bar = StageProgress(show, attack, s, state.n_stages, len(plan), done,
                                sum(engine.cost_per_point(attack, setup.num_classes)))
            view.listener = bar.passes
            try:
                while state.batches_done < len(batches):
                    chunk = batches[state.batches_done: state.batches_done + K]
                    bar.start_chunk(sum(len(p) for p in chunk))
                    t0 = time.perf_counter()
                    _attack_chunk(setup, engine, state, attack, s, chunk, x_all, y_all, fp32_engine)
                    state.stage_seconds[s] += time.perf_counter() - t0
                    f, b = view.take_counts()
                    if fp32_view is not None:
                        f, b = (a + c for a, c in zip((f, b), fp32_view.take_counts()))
                    state.forward_images[s] += f
                    state.backward_images[s] += b
                    _add_zero_gradients(state, s, engine.take_zero_gradients())
                    if fp32_engine is not None:   # bf16: its fp32 second-chance APGD runs count too
                        _add_zero_gradients(state, s, fp32_engine.take_zero_gradients())
                    state.batches_done += len(chunk)
                    state.save(path)
                    bar.end_chunk(sum(len(p) for p in chunk), int(state.robust.sum()), n)
            finally:
                view.listener = None
                bar.close()
            state.stage, state.batches_done = s + 1, 0
            state.stage_start_robust = state.robust.copy()
            state.save(path)
            if show:
                log.info("after %s: robust %d/%d (%.2f%%)", attack, state.robust.sum(), n,
                         100.0 * state.robust.sum() / n)


def _measure(setup: Setup, engine, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """checks.measure_model in fp32, plus the target-class counts the class check needs."""
    with strict_fp32(setup.device):
        facts = checks.measure_model(setup.model, x, y)
    aa = getattr(engine, "autoattack", None)   # both engines read their settings from pyautoattack's object
    facts["apgd_targets"] = int(aa.apgd_targeted.n_target_classes) if aa is not None else 0
    facts["fab_targets"] = int(aa.fab.n_target_classes) if aa is not None else 0
    return facts


def _add_zero_gradients(state: ShardState, stage: int, points: int | None) -> None:
    """Add an engine's count to the stage's; a stage begun without counting (an older state file) stays None."""
    if state.batches_done == 0 and state.zero_gradients[stage] is None:
        state.zero_gradients[stage] = 0
    if points is None or state.zero_gradients[stage] is None:
        if points is None:
            state.zero_gradients[stage] = None
        return
    state.zero_gradients[stage] += int(points)


def _preflight_checks(setup: Setup, facts: list[dict[str, Any]]) -> list[checks.Check]:
    if not facts:
        return []
    return checks.preflight_checks(facts, version=setup.opts.version, attacks=setup.attacks,
                                   apgd_targets=facts[0].get("apgd_targets", 0),
                                   fab_targets=facts[0].get("fab_targets", 0))


def _reliability(setup: Setup, merged, ties: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's ``checks`` section (see checks.py for the rule behind ``unreliable``)."""
    pe = merged.per_example
    square = setup.attacks.index("square") if "square" in setup.attacks else None
    before = int(pe.robust_after(square - 1).sum()) if square else None
    late = [checks.check_zero_gradients(setup.attacks, merged.zero_gradients),
            checks.check_square(setup.attacks, pe.broken_by, before, setup.n),
            checks.check_fp32_rejected(setup.opts.precision, setup.attacks, merged.rejected),
            checks.check_ties(ties)]
    checks.warn([c for c in late if c.name != "decision_ties"])   # verify already warned about ties
    early = _preflight_checks(setup, merged.preflight)
    if not early:
        early = [checks.Check(name, checks.SKIPPED, "not measured (run state from before the checks)")
                 for name in ("randomized", "probabilities", "dynamic", "classes")]
    return checks.section(early + late)


def _attack_chunk(setup: Setup, engine, state: ShardState, attack: str, stage: int, chunk: list[np.ndarray],
                  x_all: torch.Tensor, y_all: torch.Tensor, fp32_engine=None) -> None:
    """Reference batches of one chunk: attack each, then accept only what an fp32 forward confirms.

    The engine gets the whole chunk at once: engines that merge batches run them as one device batch while
    keeping each batch's random numbers; the others attack one reference batch after another. In bf16 runs
    the points bf16 misclassifies but fp32 does not are attacked again in fp32 (``bf16.py``).
    """
    dev = setup.device
    batches = [(x_all[torch.from_numpy(pos)].to(dev), y_all[torch.from_numpy(pos)].to(dev)) for pos in chunk]
    advs = list(engine.attack_batches(attack, batches))
    if len(advs) != len(batches):
        raise RuntimeError(f"engine {setup.opts.engine} returned {len(advs)} results for {len(batches)} batches")
    for (x, _), adv in zip(batches, advs):
        _check_shape(setup, attack, x, adv)
    preds: list[torch.Tensor | None] = [None] * len(advs)
    if fp32_engine is not None:   # bf16: its fp32 check already predicted the batches it leaves unchanged
        advs, preds = fp32_second_chance(setup, state, fp32_engine, attack, stage, batches, advs)
    for pos, (_, y), adv, pred in zip(chunk, batches, advs, preds):
        _record_batch(setup, state, stage, pos, y, adv, pred)


def _record_batch(setup: Setup, state: ShardState, stage: int, pos: np.ndarray, y: torch.Tensor,
                  adv: torch.Tensor, pred: torch.Tensor | None) -> None:
    """The reference's success test (fp32 prediction on the returned image, ``pred`` when already made, differs
    from the label)."""
    dev = setup.device
    if pred is None:
        pred = fp32_predictions(setup.model, adv, dev)
    fooled = (pred != y).cpu().numpy()
    hit = pos[fooled]
    if len(hit):
        state.robust[hit] = False
        state.broken_by[hit] = stage
        state.adv_pred[hit] = pred.cpu().numpy()[fooled]
        state.x_adv[hit] = adv[torch.from_numpy(fooled).to(dev)].float().cpu().numpy()


def _check_shape(setup: Setup, attack: str, x: torch.Tensor, adv: torch.Tensor) -> None:
    if not isinstance(adv, torch.Tensor) or adv.shape != x.shape:
        raise RuntimeError(f"engine {setup.opts.engine} returned {getattr(adv, 'shape', type(adv))} for a batch of "
                           f"shape {tuple(x.shape)} in {attack}")


# ---------------------------------------------------------------- checks and the record


def _finalize(setup: Setup, doc: dict[str, Any], split: int | None = None) -> RunRecord:
    o = setup.opts
    merged = merge_states(setup.run_dir, setup.config_hash, setup.data.indices, split)
    pe = dataclasses.replace(merged.per_example, config_hash=setup.config_hash)
    check_adversarial(pe, setup.data.x.numpy(), setup.norm, setup.eps)
    ties = verify_predictions(setup, pe)
    n = setup.n
    stages = []
    for s, attack in enumerate(setup.attacks):
        robust_s = int(pe.robust_after(s).sum())
        stages.append(Stage(attack=attack, robust=Accuracy(robust_s, n), seconds=merged.stage_seconds[s],
                            forward_passes=int(merged.forward_images[s]),
                            backward_passes=int(merged.backward_images[s])))
    record = RunRecord(
        run_id=doc["run_id"], model=setup.label, dataset=setup.data.dataset, threat=o.threat, norm=setup.norm,
        eps=o.eps, eps_value=setup.eps, version=o.version, attacks=setup.attacks, seed=o.seed,
        indices=setup.data.indices, clean=Accuracy(int(pe.clean_correct.sum()), n),
        robust=Accuracy(int(pe.robust.sum()), n), stages=tuple(stages), engine=f"{o.engine} "
        f"{setup.engine_version}", precision=o.precision, batch_size=o.batch_size,
        libraries=library_versions(), device=devices.name(setup.device),
        checkpoint={k: setup.checkpoint.get(k) for k in ("source", "sha256", "path", "weights_sha256", "provenance")},
        data=dict(setup.data.source), config_hash=setup.config_hash, created=doc["created"], complete=True,
        per_example_file=f"{doc['run_id']}.npz", checks=_reliability(setup, merged, ties),
        extra={"shards": merged.shard_count, "channels_last": o.channels_last, "torch_compile": o.torch_compile,
               "tf32": tf32_in_effect(o.precision, setup.device), "cudnn": cudnn_in_effect(setup.device),
               "clean_seconds": round(merged.clean_seconds, 3),
               "fp32_rejected_successes": merged.rejected, "decision_ties": ties,
               "threads": o.threads,
               "pass_counts": "images through the model inside the attacks (forward / backward)",
               "model_dataset": o.dataset, "run_dir": str(setup.run_dir.resolve()),
               "finished": utc_timestamp()},
        trained_threat=o.trained_threat)   # differs from threat when a checkpoint is evaluated cross-threat
    arrays = pe.to_bytes()
    record = dataclasses.replace(record, integrity=integrity.seal(arrays, setup.config, doc["invocation"]))
    record.validate()
    _write_record(setup.results_dir, setup.run_dir, record, arrays)
    return record


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _write_record(results_dir: Path, run_dir: Path, record: RunRecord, arrays: bytes) -> None:
    """Arrays first, so the JSON never points at a missing file; a failure of either leaves neither (a JSON
    already there from an earlier finalisation of this run keeps its arrays). A full, over-quota or read-only
    disk is the user's to fix: the run state stays, and re-running writes the record. (Corruptions runs too.)"""
    json_path = results_dir / record.relative_path()
    npz_path = per_example_path(json_path)
    remove_stale_temp_files(json_path.parent)
    try:
        atomic_write_bytes(npz_path, arrays)   # the sealed bytes (integrity)
        record.write(results_dir)
    except OSError as exc:
        if not json_path.exists():
            npz_path.unlink(missing_ok=True)
        if exc.errno not in _DISK_FULL:
            raise
        raise ZooError(f"cannot write the record into {json_path.parent} ({exc.strerror or os.strerror(exc.errno)})",
                       hint=f"free space (or fix the folder) and re-run the same command: the finished run is kept "
                            f"in {run_dir} and resumes straight to writing the record, without attacking "
                            "again") from None


def _execute(setup: Setup, live: Live) -> RunRecord | None:
    """The run, holding the run folder's lock (``runlock``) throughout; orphaned temp files go first."""
    try:
        setup.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the run folder {setup.run_dir} ({exc.strerror})",
                            hint="pass --run-dir with a folder you can write to") from None
    with runlock.holding(setup.run_dir, setup.shard):
        remove_stale_temp_files(setup.run_dir)
        return _execute_locked(setup, live)


def _execute_locked(setup: Setup, live: Live) -> RunRecord | None:
    doc = start_run_folder(setup.run_dir, setup.config, setup.config_hash, setup.invocation)
    i, k = setup.shard
    bounds = shard_bounds(setup.n, k)[i]
    positions = np.arange(*bounds, dtype=np.int64)
    path = shard_path(setup.run_dir, i, k)
    if setup.is_rank0:
        log.info("run folder %s (shard %d/%d: examples %d..%d)", setup.run_dir, i, k, bounds[0], bounds[1] - 1)
    if path.exists():
        state = ShardState.load(path)
        if state.config_hash != setup.config_hash or not np.array_equal(state.positions, positions):
            raise RunStateError(f"{path} belongs to a different configuration or split",
                                hint=f"delete {path} to redo this shard")
        if not state.done and setup.is_rank0:
            log.info("resuming at stage %d of %d, batch %d", state.stage + 1, state.n_stages, state.batches_done)
    else:
        state = ShardState.new(setup.config_hash, i, k, positions, len(setup.attacks), tuple(setup.data.x.shape[1:]))
    if not state.done:
        if not devices.is_gpu(setup.device) and setup.is_rank0:
            est = estimate(setup, n_points=len(positions))
            log.warning("running on CPU: this run may take about %s (up to %s if every example survives every "
                        "attack); a GPU is much faster", fmt_seconds(est.typical_seconds or est.max_seconds),
                        fmt_seconds(est.max_seconds))
        _run_shard(setup, live, state, path)
    if k > 1:
        if setup.dist is not None:
            if setup.dist.rank != 0:
                return None
            wait_for_shards(setup.run_dir, k)
        else:
            pending = unfinished_shards(setup.run_dir, k)
            if pending:
                log.info("shard %d/%d finished; still waiting for shard(s) %s. When they are done, the last one "
                         "writes the record (or run `zoo-eval merge %s`)", i, k, pending, setup.run_dir)
                return None
    return _finalize(setup, doc, k)


# ---------------------------------------------------------------- public API


def run(model_or_name: nn.Module | str, options: RunOptions | None = None, /, **overrides: Any
        ) -> RunRecord | None:
    """Evaluate a model with AutoAttack, faithfully to pyautoattack, resumably; returns the RunRecord.

    ``model_or_name`` is a registry name (loaded with ``zoo.load``, ``checkpoint=PATH`` overriding the
    download) or any ``nn.Module`` taking [0, 1] NCHW images (``model_label`` names it in results). The
    options are the fields of :class:`~zoo.evaluate.options.RunOptions`, given as keywords (or as a
    ``RunOptions`` with keyword overrides). Returns None when this process ran one shard and others are still
    missing (or on torchrun ranks > 0). Re-running the same call resumes from the run folder (default: under
    the score-zoo cache, keyed by the configuration hash). The module is put in eval mode with frozen
    parameters, on ``device``.
    """
    if str(RunOptions.build(options, **overrides).threat).lower() == "corruptions":   # no attack: corruptions.py
        from . import corruptions
        return corruptions.run(model_or_name, options, **overrides)
    setup = prepare(model_or_name, RunOptions.build(options, **overrides))
    live = Live(device_batch=setup.device_batch)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(setup.opts.threads)
    try:
        return _run_with_oom_backoff(setup, live)
    finally:
        torch.set_num_threads(threads_before)


def _run_with_oom_backoff(setup: Setup, live: Live) -> RunRecord | None:
    while True:
        try:
            return _execute(setup, live)
        except Exception as exc:
            if not devices.is_out_of_memory(exc):
                raise
            if setup.opts.torch_compile is not None:   # CUDA graphs keep their memory pools until dynamo lets go
                live.attack_model = None
                torch._dynamo.reset()
            devices.empty_cache()
            before = live.device_batch
            if not _shrink_device_batch(setup, live):
                B = setup.opts.batch_size
                raise ZooError(f"the GPU ran out of memory with batch size {B}",
                               hint=f"re-run with --batch-size {max(1, B // 2)} (a new run: the batch size changes "
                                    "AutoAttack's batches, so it is part of the configuration)") from None
            log.warning("out of GPU memory with merged device batches (cap %s points); resuming with a cap of %d "
                        "(the device batch is not part of the configuration: finished work is kept)",
                        "none" if before is None else before, live.device_batch)


def _shrink_device_batch(setup: Setup, live: Live) -> bool:
    """Halve the cap on merged device batches, down to B; False when that cannot help.

    Engines that merge reference batches (native) fill device batches up to the cap (or a whole chunk
    without one) whatever B is. The cap is not part of the configuration: the run resumes from its saved
    state, and the engine, built per shard run, takes the new cap. Once device batches are single reference
    batches only a smaller B (a new run, the user's choice) can help.
    """
    if not engine_class(setup.opts.engine).merges_batches:
        return False
    B = setup.opts.batch_size
    # a device batch never holds more than one chunk of reference batches, nor more than every example
    largest = min(c for c in (live.device_batch, B * setup.opts.chunk_batches, setup.n) if c is not None)
    if largest <= B:
        return False
    live.device_batch = max(B, largest // 2)
    return True


def plan(model_or_name: nn.Module | str, options: RunOptions | None = None, /, **overrides: Any) -> Plan:
    """What ``run`` with the same options would do and roughly what it costs; runs no attack."""
    if str(RunOptions.build(options, **overrides).threat).lower() == "corruptions":
        raise BadInputError("--dry-run estimates attack runs; --threat corruptions is one fp32 forward pass per "
                            "image of 75 sets", hint="run it directly (it is resumable and shows an ETA)")
    setup = prepare(model_or_name, RunOptions.build(options, **{**overrides, "progress": False}), planning=True)
    est = estimate(setup)
    return Plan(setup=setup, estimate=est, text=plan_text(setup, est))


def merge(run_dir: str | Path, model: nn.Module | None = None, results_dir: str | Path | None = None,
          device: str | torch.device | None = None) -> RunRecord:
    """Join the finished shards in ``run_dir``, check them and write the record.

    The model and data are rebuilt from the run's saved invocation (so the adversarial examples can be
    re-checked with an fp32 forward); runs started from Python with a custom module need ``model=``.
    """
    run_dir = Path(run_dir).expanduser()
    doc = read_config(run_dir)
    inv = doc["invocation"]
    if inv["model_kind"] == "module" and model is None:
        raise BadInputError(f"{run_dir} was started from Python with a custom module ({inv['model']})",
                            hint="merge it from Python: zoo.evaluate.merge(run_dir, model=the_module)")
    options = RunOptions.from_invocation(inv, run_dir=run_dir, shard=(0, doc["config"].get("shards", 1)),
                                         progress=False, **({} if device is None else {"device": device}),
                                         **({} if results_dir is None else {"results_dir": results_dir}))
    target = model if model is not None else inv["model"]
    if doc["config"].get("kind") == "corruptions":   # its own set-up and record; the same checks
        from . import corruptions
        setup, finalize = corruptions.prepare(target, options), corruptions._finalize
    else:
        setup, finalize = prepare(target, options, attacking=False), _finalize
    if setup.config_hash != doc["config_hash"]:
        diff = config_differences(doc["config"], setup.config)
        raise RunStateError(f"{run_dir} was made with a different configuration than can be rebuilt now "
                            f"(differs in: {', '.join(diff)})",
                            hint="merge with the same library versions, checkpoint and data as the run")
    return finalize(setup, doc)


def invocation_of(run_dir: str | Path) -> dict[str, Any]:
    """The arguments a run folder was started with (for ``zoo-eval --resume``)."""
    return dict(read_config(run_dir)["invocation"])
