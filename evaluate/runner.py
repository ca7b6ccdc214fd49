"""The staged AutoAttack evaluation, made resumable, shardable and self-checking.

Schedule (identical to pyautoattack's ``run_standard_evaluation(x, y, batch_size=B)``): clean predictions
in batches of B; then for each attack the examples still robust at the start of the stage, sorted, cut into
consecutive batches of B, each attacked with the seed reset; an example is non-robust once the model's
prediction on the returned image differs from its label. The per-batch attack call goes to an engine
(``engine.py``). Work is saved after every chunk of batches, so a killed run resumes where it stopped with
the same batches, hence the same result.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from zoo.errors import BadInputError, ZooError

from .compiled import compiled_for_attacks
from .engine import AttackView, engine_class, make_engine
from .estimate import Plan, estimate, fmt_seconds, plan_text
from .prepare import (DEFAULT_CHUNK_BATCHES, Setup, configure, invocation_kwargs, library_versions, precision_mode,
                      prepare, strict_fp32, tf32_in_effect)
from .record import Accuracy, AdversarialCheckError, PerExample, RunRecord, Stage, check_adversarial, per_example_path
from .sharding import merge_states, shard_bounds, shard_path, unfinished_shards, wait_for_shards
from .state import CLEAN_STAGE, ShardState, config_differences, read_config, write_config_once

log = logging.getLogger("zoo.evaluate")

TIE_TOLERANCE = 1e-5          # logit margins this small may flip with the batch composition


# ---------------------------------------------------------------- progress


class _Progress:
    """tqdm bar on a terminal, a log line per chunk otherwise; silent on ranks other than 0."""

    def __init__(self, enabled: bool, attack: str, stage: int, n_stages: int, total: int, done: int):
        self.enabled = enabled
        self.attack, self.total, self.done = attack, total, done
        self.start_done, self.start_time = done, time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            width = shutil.get_terminal_size(fallback=(100, 24)).columns or 100
            self.bar = tqdm(total=total, initial=done, desc=f"[{stage + 1}/{n_stages}] {attack}", unit="pt",
                            file=sys.stderr, ncols=width)

    def update(self, points: int, robust: int, n: int) -> None:
        self.done += points
        acc = 100.0 * robust / n if n else 0.0
        if self.bar is not None:
            self.bar.update(points)
            self.bar.set_postfix_str(f"robust {acc:.2f}%")
        elif self.enabled:
            elapsed = time.monotonic() - self.start_time
            rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d points attacked, %d left, robust %.2f%% so far, ETA %s", self.attack, self.done,
                     self.total, self.total - self.done, acc, fmt_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the loop


def _predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with strict_fp32(device):
        return model(x).argmax(dim=1)


def _run_shard(setup: Setup, state: ShardState, path: Path) -> None:
    dev, B, K = setup.device, setup.batch_size, setup.chunk_batches
    positions = torch.from_numpy(state.positions)
    x_all = setup.data.x[positions].contiguous()
    y_all = setup.data.y[positions]
    n = len(state.positions)
    autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
    if setup.attack_model is None:  # compiled here, not in prepare: plan() and merge() never attack
        with precision_mode(setup.precision, dev):   # the TF32 setting is part of what gets compiled
            setup.attack_model = compiled_for_attacks(setup.model, setup.torch_compile, tuple(x_all.shape[1:]),
                                                      dev, autocast_dtype)
    view = AttackView(setup.attack_model, autocast_dtype, fp32_model=setup.model)
    engine = make_engine(setup.engine_name, view, norm=setup.norm, eps=setup.eps, version=setup.version,
                         attacks=list(setup.attacks), seed=setup.seed, device=dev, precision=setup.precision,
                         max_device_batch=setup.device_batch)
    if tuple(engine.attacks) != setup.attacks:
        raise ZooError(f"engine {setup.engine_name} runs {list(engine.attacks)}, expected {list(setup.attacks)}")
    show = setup.progress and setup.is_rank0
    with torch.no_grad(), precision_mode(setup.precision, dev):
        if state.stage == CLEAN_STAGE:
            engine.preflight(x_all[:B].to(dev), y_all[:B].to(dev))
            view.take_counts()  # the checks' forward passes are not an attack's cost
            t0 = time.perf_counter()
            pred = torch.empty(n, dtype=torch.int64)
            for start in range(0, n, B):
                pred[start:start + B] = _predict(setup.model, x_all[start:start + B].to(dev), dev).cpu()
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
            bar = _Progress(show, attack, s, state.n_stages, len(plan), sum(len(b) for b in batches[:state.batches_done]))
            try:
                while state.batches_done < len(batches):
                    chunk = batches[state.batches_done: state.batches_done + K]
                    t0 = time.perf_counter()
                    _attack_chunk(setup, engine, state, attack, s, chunk, x_all, y_all)
                    state.stage_seconds[s] += time.perf_counter() - t0
                    f, b = view.take_counts()
                    state.forward_images[s] += f
                    state.backward_images[s] += b
                    state.batches_done += len(chunk)
                    state.save(path)
                    bar.update(sum(len(p) for p in chunk), int(state.robust.sum()), n)
            finally:
                bar.close()
            state.stage, state.batches_done = s + 1, 0
            state.stage_start_robust = state.robust.copy()
            state.save(path)
            if show:
                log.info("after %s: robust %d/%d (%.2f%%)", attack, state.robust.sum(), n,
                         100.0 * state.robust.sum() / n)


def _attack_chunk(setup: Setup, engine, state: ShardState, attack: str, stage: int, chunk: list[np.ndarray],
                  x_all: torch.Tensor, y_all: torch.Tensor) -> None:
    """Reference batches of one chunk: attack each, then accept only what an fp32 forward confirms.

    Engines with ``attack_batches`` get the whole chunk at once (they may merge the batches on the device
    while keeping each batch's random numbers); others get one reference batch per call.
    """
    dev = setup.device
    batches = [(x_all[torch.from_numpy(pos)].to(dev), y_all[torch.from_numpy(pos)].to(dev)) for pos in chunk]
    if hasattr(engine, "attack_batches"):
        advs = list(engine.attack_batches(attack, batches))
    else:
        advs = [engine.attack_batch(attack, x, y) for x, y in batches]
    if len(advs) != len(batches):
        raise ZooError(f"engine {setup.engine_name} returned {len(advs)} results for {len(batches)} batches")
    for pos, (x, y), adv in zip(chunk, batches, advs):
        _record_batch(setup, state, attack, stage, pos, x, y, adv)


def _record_batch(setup: Setup, state: ShardState, attack: str, stage: int, pos: np.ndarray, x: torch.Tensor,
                  y: torch.Tensor, adv: torch.Tensor) -> None:
    """The reference's success test (prediction on the returned image differs from the label), in fp32."""
    dev = setup.device
    if not isinstance(adv, torch.Tensor) or adv.shape != x.shape:
        raise ZooError(f"engine {setup.engine_name} returned {getattr(adv, 'shape', type(adv))} for a batch of "
                       f"shape {tuple(x.shape)} in {attack}")
    pred = _predict(setup.model, adv, dev)
    fooled = (pred != y).cpu().numpy()
    if setup.precision == "bf16":  # successes the bf16 attack believed in but fp32 does not confirm
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            claimed = (setup.model(adv).argmax(dim=1) != y).cpu().numpy()
        state.rejected[stage] += int((claimed & ~fooled).sum())
    hit = pos[fooled]
    if len(hit):
        state.robust[hit] = False
        state.broken_by[hit] = stage
        state.adv_pred[hit] = pred.cpu().numpy()[fooled]
        state.x_adv[hit] = adv[torch.from_numpy(fooled).to(dev)].float().cpu().numpy()


# ---------------------------------------------------------------- checks and the record


def _verify_predictions(setup: Setup, per_example: PerExample) -> list[dict[str, Any]]:
    """fp32 forwards must reproduce the clean-correct flags on the clean images and the robust flags on the
    final adversarial images (so a stale run folder or a changed model can never pass as this run).

    Returns the near-ties (|logit margin| below TIE_TOLERANCE, where the batch composition alone can flip
    the label); any other disagreement raises AdversarialCheckError.
    """
    x_adv = setup.data.x.clone()
    if len(per_example.adv_positions):
        x_adv[torch.from_numpy(per_example.adv_positions)] = torch.from_numpy(per_example.x_adv)
    bad, ties = [], []
    for what, images, claimed in (("clean", setup.data.x, per_example.clean_correct),
                                  ("robust", x_adv, per_example.robust)):
        found_bad, found_ties = _disagreements(setup, images, torch.from_numpy(claimed), per_example.indices)
        bad += [dict(item, flag=what) for item in found_bad]
        ties += [dict(item, flag=what) for item in found_ties]
    if bad:
        raise AdversarialCheckError(
            f"an fp32 forward pass does not reproduce the clean/robust flags of {len(bad)} example(s) "
            f"(first: {bad[:3]})", hint="this is a bug in the attack engine, a non-deterministic model, or a run "
                                        "folder of another model: no result was written")
    if ties:
        log.warning("%d example(s) sit on a decision tie (|margin| <= %g); their flags may depend on the batch: %s",
                    len(ties), TIE_TOLERANCE, ties[:5])
    return ties


def _disagreements(setup: Setup, x: torch.Tensor, claimed: torch.Tensor, indices: np.ndarray
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(real disagreements, near-ties) between ``claimed`` correctness flags and an fp32 forward on ``x``."""
    dev, B, y = setup.device, setup.batch_size, setup.data.y
    bad, ties = [], []
    with torch.no_grad(), strict_fp32(dev):
        for start in range(0, len(x), B):
            logits = setup.model(x[start:start + B].to(dev)).float().cpu()
            yb = y[start:start + B]
            correct = logits.argmax(dim=1) == yb
            for j in torch.nonzero(correct != claimed[start:start + B]).flatten().tolist():
                row = logits[j]
                other = torch.cat([row[: yb[j]], row[yb[j] + 1:]]).max()
                margin = float(row[yb[j]] - other)
                scale = max(1.0, float(row.abs().max()))
                item = {"position": start + j, "index": int(indices[start + j]), "margin": margin}
                (ties if abs(margin) <= TIE_TOLERANCE * scale else bad).append(item)
    return bad, ties


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _finalize(setup: Setup, doc: dict[str, Any], split: int | None = None) -> RunRecord:
    merged = merge_states(setup.run_dir, setup.config_hash, setup.data.indices, split)
    pe = merged.per_example
    check_adversarial(pe, setup.data.x.numpy(), setup.norm, setup.eps)
    ties = _verify_predictions(setup, pe)
    n = setup.n
    stages = []
    by_stage = {"clean": float(pe.clean_correct.mean())}
    for s, attack in enumerate(setup.attacks):
        robust_s = int(pe.robust_after(s).sum())
        stages.append(Stage(attack=attack, robust=Accuracy(robust_s, n), seconds=merged.stage_seconds[s],
                            forward_passes=int(merged.forward_images[s]),
                            backward_passes=int(merged.backward_images[s])))
        by_stage[attack] = robust_s / n
    view = AttackView(setup.model)
    engine = make_engine(setup.engine_name, view, norm=setup.norm, eps=setup.eps, version=setup.version,
                         attacks=list(setup.attacks), seed=setup.seed, device=setup.device, precision=setup.precision)
    engine.finish(by_stage)
    record = RunRecord(
        run_id=doc["run_id"], model=setup.label, dataset=setup.data.dataset, threat=setup.threat, norm=setup.norm,
        eps=setup.eps_text, eps_value=setup.eps, version=setup.version, attacks=setup.attacks, seed=setup.seed,
        indices=setup.data.indices, clean=Accuracy(int(pe.clean_correct.sum()), n),
        robust=Accuracy(int(pe.robust.sum()), n), stages=tuple(stages), engine=f"{setup.engine_name} "
        f"{setup.engine_version}", precision=setup.precision, batch_size=setup.batch_size,
        libraries=library_versions(), device=_device_name(setup.device),
        checkpoint={k: setup.checkpoint.get(k) for k in ("source", "sha256", "path", "weights_sha256")},
        data=dict(setup.data.source), config_hash=setup.config_hash, created=doc["created"], complete=True,
        per_example_file=f"{doc['run_id']}.npz",
        extra={"shards": merged.shard_count, "channels_last": setup.channels_last, "torch_compile": setup.torch_compile,
               "tf32": tf32_in_effect(setup.precision, setup.device), "clean_seconds": round(merged.clean_seconds, 3),
               "fp32_rejected_successes": merged.rejected, "decision_ties": ties,
               "pass_counts": "images through the model inside the attacks (forward / backward)",
               "model_dataset": setup.model_dataset, "run_dir": str(setup.run_dir.resolve()),
               "finished": _now()})
    record.validate()
    json_path = setup.results_dir / record.relative_path()
    pe.write(per_example_path(json_path))   # arrays first: the JSON never points at a missing file
    record.write(setup.results_dir)
    return record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _execute(setup: Setup) -> RunRecord | None:
    created = _now()
    stamp = created.replace("-", "").replace(":", "").replace("+0000", "")[:15]
    try:
        setup.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the run folder {setup.run_dir} ({exc.strerror})",
                            hint="pass --run-dir with a folder you can write to") from None
    doc = write_config_once(setup.run_dir, {
        "config": setup.config, "config_hash": setup.config_hash, "invocation": setup.invocation,
        "created": created, "run_id": f"{stamp}-{setup.config_hash[:8]}"})
    i, k = setup.shard
    bounds = shard_bounds(setup.n, k)[i]
    positions = np.arange(*bounds, dtype=np.int64)
    path = shard_path(setup.run_dir, i, k)
    if setup.is_rank0:
        log.info("run folder %s (shard %d/%d: examples %d..%d)", setup.run_dir, i, k, bounds[0], bounds[1] - 1)
    if path.exists():
        state = ShardState.load(path)
        if state.config_hash != setup.config_hash or not np.array_equal(state.positions, positions):
            raise BadInputError(f"{path} belongs to a different configuration or split",
                                hint=f"delete {path} to redo this shard")
        if not state.done and setup.is_rank0:
            log.info("resuming at stage %d of %d, batch %d", state.stage + 1, state.n_stages, state.batches_done)
    else:
        state = ShardState.new(setup.config_hash, i, k, positions, len(setup.attacks), tuple(setup.data.x.shape[1:]))
    if not state.done:
        if setup.device.type == "cpu" and setup.is_rank0:
            est = estimate(setup, n_points=len(positions))
            log.warning("running on CPU: this run may take about %s (up to %s if every example survives every "
                        "attack); a GPU is much faster", fmt_seconds(est.typical_seconds or est.max_seconds),
                        fmt_seconds(est.max_seconds))
        _run_shard(setup, state, path)
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


def run(model_or_name: nn.Module | str, *, dataset: str = "cifar10", threat: str = "linf",
        eps: str | float | None = None, n_ex: int | None = None, data: str | Path | None = None,
        data_dir: str | Path | None = None, version: str = "standard", attacks: Sequence[str] | str | None = None,
        seed: int = 0, batch_size: int | None = None, device: str | torch.device | None = None,
        precision: str = "fp32", engine: str = "reference", results_dir: str | Path = "results",
        run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
        shard: tuple[int, int] | str | None = None, model_label: str | None = None,
        chunk_batches: int = DEFAULT_CHUNK_BATCHES, channels_last: bool | None = None,
        torch_compile: str | None = None, progress: bool | None = None) -> RunRecord | None:
    """Evaluate a model with AutoAttack, faithfully to pyautoattack, resumably; returns the RunRecord.

    ``model_or_name`` is a registry name (loaded with ``zoo.load``, ``checkpoint=PATH`` overriding the
    download) or any ``nn.Module`` taking [0, 1] NCHW images (``model_label`` names it in results).
    Returns None when this process ran one shard and others are still missing (or on torchrun ranks > 0).
    Re-running the same call resumes from the run folder (default: under the score-zoo cache, keyed by
    the configuration hash). The module is put in eval mode with frozen parameters, on ``device``.
    """
    setup = prepare(model_or_name, dataset=dataset, threat=threat, eps=eps, n_ex=n_ex, data=data,
                     data_dir=data_dir, version=version, attacks=attacks, seed=seed, batch_size=batch_size,
                     device=device, precision=precision, engine=engine, results_dir=results_dir, run_dir=run_dir,
                     checkpoint=checkpoint, shard=shard, model_label=model_label, chunk_batches=chunk_batches,
                     channels_last=channels_last, torch_compile=torch_compile, progress=progress)
    while True:
        try:
            return _execute(setup)
        except torch.cuda.OutOfMemoryError:
            if setup.torch_compile is not None:   # CUDA graphs keep their memory pools until dynamo lets go
                setup.attack_model = None
                torch._dynamo.reset()
            torch.cuda.empty_cache()
            before = setup.device_batch
            if _shrink_device_batch(setup):
                log.warning("out of GPU memory with merged device batches (cap %s points); resuming with a cap of %d "
                            "(the device batch is not part of the configuration: finished work is kept)",
                            "none" if before is None else before, setup.device_batch)
                continue
            if not setup.batch_auto or setup.dist is not None or setup.shard[1] > 1 \
                    or setup.run_dir_arg is not None or setup.batch_size == 1:
                raise ZooError(f"the GPU ran out of memory with batch size {setup.batch_size}",
                               hint=f"re-run with --batch-size {max(1, setup.batch_size // 2)} (a new run: the batch "
                                    "size changes AutoAttack's batches, so it is part of the configuration)") from None
            log.warning("out of GPU memory at batch size %d; starting over with %d (the batch size is part of the "
                        "configuration, so this is a new run)", setup.batch_size, setup.batch_size // 2)
            setup.batch_size //= 2
            if setup.device_batch is not None:  # device batches of the old B did not fit either
                setup.device_batch = min(setup.device_batch, setup.batch_size)
            configure(setup)


def _shrink_device_batch(setup: Setup) -> bool:
    """Halve the cap on merged device batches, down to B; False when that cannot help.

    Engines that merge reference batches (native) fill device batches up to ``setup.device_batch`` (or a
    whole chunk without a cap) whatever B is, so halving B alone would not shrink them. The cap is not part
    of the configuration: the run resumes from its saved state, and the engine, built per shard run, takes
    the new cap. Only once device batches are single reference batches must B itself shrink (a new run).
    """
    if "max_device_batch" not in inspect.signature(engine_class(setup.engine_name)).parameters:
        return False
    B = setup.batch_size
    # a device batch never holds more than one chunk of reference batches, nor more than every example
    largest = min(c for c in (setup.device_batch, B * setup.chunk_batches, setup.n) if c is not None)
    if largest <= B:
        return False
    setup.device_batch = max(B, largest // 2)
    return True


def plan(model_or_name: nn.Module | str, **kwargs) -> Plan:
    """What ``run`` with the same arguments would do and roughly what it costs; runs no attack."""
    defaults = {name: p.default for name, p in inspect.signature(run).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    defaults["progress"] = False
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"plan() got unexpected argument(s) {sorted(unknown)}")
    setup = prepare(model_or_name, **{**defaults, **kwargs})
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
    if device is None:
        device = doc["config"]["device_type"]
    setup = prepare(model if model is not None else inv["model"],
                    **{**invocation_kwargs(inv), "device": device, "results_dir": results_dir or inv["results_dir"],
                       "run_dir": run_dir, "shard": (0, doc["config"].get("shards", 1)),
                       "chunk_batches": DEFAULT_CHUNK_BATCHES, "progress": False})
    if setup.config_hash != doc["config_hash"]:
        diff = config_differences(doc["config"], setup.config)
        raise BadInputError(f"{run_dir} was made with a different configuration than can be rebuilt now "
                            f"(differs in: {', '.join(diff)})",
                            hint="merge with the same library versions, checkpoint and data as the run")
    return _finalize(setup, doc)


def invocation_of(run_dir: str | Path) -> dict[str, Any]:
    """The arguments a run folder was started with (for ``zoo-eval --resume``)."""
    return dict(read_config(run_dir)["invocation"])
