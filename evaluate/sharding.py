"""Splitting a run over processes (torchrun ranks, Slurm array tasks, ``--shard I/K``) and joining it again.

Shards are contiguous slices of the run's example list whose sizes differ by at most one: no padding, no
duplicates. Each shard runs the full AutoAttack schedule on its own examples and keeps its own state file
in the shared run folder; the merge joins them by example position and refuses anything that does not
cover every example exactly once with one configuration.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo import constants
from zoo.errors import BadInputError, RunStateError

from .record import PerExample
from .state import ShardState, shard_file_name

log = logging.getLogger("zoo.evaluate")

_SHARD_FILE = re.compile(r"^shard-(\d{3,})-of-(\d{3,})\.npz$")


def shard_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``count`` contiguous shards of ``n`` items; sizes differ by at most 1."""
    if count < 1:
        raise BadInputError(f"the number of shards must be at least 1, got {count}")
    if count > n:
        raise BadInputError(f"{count} shards for {n} examples would leave some shards empty",
                            hint=f"use at most {n} shards")
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def parse_shard(text: str) -> tuple[int, int]:
    """'I/K' -> (I, K) with 0 <= I < K."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise BadInputError(f"cannot parse --shard {text!r}",
                            hint="write it as I/K, e.g. --shard 0/4 (I counts from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise BadInputError(f"--shard {text}: need 0 <= I < K", hint="shards are numbered 0 .. K-1")
    return index, count


@dataclass(frozen=True)
class DistributedEnv:
    """What torchrun (or any launcher setting the same variables) told this process."""

    rank: int
    world_size: int
    local_rank: int


def distributed_env() -> DistributedEnv | None:
    """RANK / WORLD_SIZE / LOCAL_RANK when launched by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise BadInputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers",
                            hint="launch with torchrun, or unset them and use --shard I/K") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise BadInputError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    return DistributedEnv(rank=rank, world_size=world, local_rank=local)


def shard_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).iterdir() if _SHARD_FILE.match(p.name))


def shard_path(run_dir: Path, index: int, count: int) -> Path:
    return Path(run_dir) / shard_file_name(index, count)


def unfinished_shards(run_dir: Path, count: int, name: Callable[[int, int], str] = shard_file_name,
                      finished: Callable[[Path], bool] = ShardState.is_finished) -> list[int]:
    """The indices of this split's shards whose state files are missing or not finished yet. ``name`` and
    ``finished`` say how a run kind names its shard files and tells a finished one (corruptions runs have
    their own)."""
    return [i for i in range(count) if not finished(Path(run_dir) / name(i, count))]


def wait_for_shards(run_dir: Path, count: int, poll_seconds: float = 2.0, timeout: float | None = None,
                    name: Callable[[int, int], str] = shard_file_name,
                    finished: Callable[[Path], bool] = ShardState.is_finished) -> None:
    """Block until all ``count`` shard files of this split exist and are finished (torchrun's rank 0).

    Gives up after ``timeout`` seconds (default: ``SCORE_ZOO_SHARD_TIMEOUT``, 4 hours) with the commands
    that finish the run, rather than hanging when another rank died or was never started.
    """
    if timeout is None:
        timeout = constants.shard_timeout()
    start = time.monotonic()
    last_note = 0.0
    while True:
        pending = unfinished_shards(run_dir, count, name, finished)
        if not pending:
            return
        waited = time.monotonic() - start
        if waited > timeout:
            commands = "; ".join(f"zoo-eval --resume {run_dir} --shard {i}/{count}" for i in pending)
            raise RunStateError(
                f"shard(s) {pending} of {count} did not finish within {timeout:.0f} s of this shard "
                f"({', '.join(name(i, count) for i in pending)} in {run_dir} missing or unfinished); "
                "finished shards are kept",
                hint=f"finish them with `{commands}` (each resumes where it stopped; the last one writes the "
                     f"record), or run them elsewhere and then `zoo-eval merge {run_dir}`; "
                     f"{constants.SHARD_TIMEOUT_ENV} sets how long to wait")
        if waited - last_note >= 60 or last_note == 0.0:
            log.info("waiting for shard(s) %s of %d to finish (giving up after %.0f s)", pending, count, timeout)
            last_note = waited or 1e-9
        time.sleep(min(poll_seconds, max(timeout - waited, 0.0) + 0.01))


@dataclass(frozen=True)
class Merged:
    """All shards joined: per-example arrays in run order plus summed costs per stage."""

    per_example: PerExample
    clean_seconds: float
    stage_seconds: list[float]
    forward_images: list[int]
    backward_images: list[int]
    rejected: list[int]
    shard_count: int
    zero_gradients: list[int | None]          # None: some shard did not count them
    preflight: list[dict]                     # each shard's checks.measure_model facts (where measured)


def _split_of(path: Path) -> int:
    return int(_SHARD_FILE.match(path.name).group(2))


def _pick_split(run_dir: Path, files: list[Path]) -> int:
    """The split (K) to merge when the folder holds files of several (e.g. a sharded try, then a plain run)."""
    splits = sorted({_split_of(p) for p in files})
    if len(splits) == 1:
        return splits[0]
    finished = []
    for k in splits:
        mine = [p for p in files if _split_of(p) == k]
        try:
            if len(mine) == k and all(ShardState.load(p).done for p in mine):
                finished.append(k)
        except BadInputError:
            continue
    if len(finished) == 1:
        return finished[0]
    raise RunStateError(f"{run_dir} holds shard files of several splits (K = {splits}), "
                        f"{'none' if not finished else 'more than one'} of them complete",
                        hint="delete the shard-*-of-K files of the split you do not want, then merge")


def merge_states(run_dir: Path, config_hash: str, indices: tuple[int, ...], count: int | None = None) -> Merged:
    """Join the shard files of one split in ``run_dir``; refuse mixed configurations, unfinished shards,
    gaps or overlaps. ``count`` picks the split (K); by default the only one, or the only complete one."""
    files = shard_files(run_dir)
    if not files:
        raise RunStateError(f"{run_dir} holds no shard state files", hint="start the run first")
    count = _pick_split(run_dir, files) if count is None else count
    files = [p for p in files if _split_of(p) == count]
    if not files:
        raise RunStateError(f"{run_dir} holds no shard files of the {count}-way split", hint="run the shards first")
    states = [(p, ShardState.load(p)) for p in files]
    foreign = [p.name for p, s in states if s.config_hash != config_hash]
    if foreign:
        raise RunStateError(f"shard file(s) {foreign} in {run_dir} belong to a different configuration",
                            hint="remove them, or merge each run folder separately")
    unfinished = [f"{p.name} (stage {s.stage + 1} of {s.n_stages})" for p, s in states if not s.done]
    if unfinished:
        raise RunStateError(f"shard(s) not finished: {', '.join(unfinished)}",
                            hint="run the missing shards (re-running a shard command resumes it), then merge")
    n = len(indices)
    owner = np.full(n, -1, np.int64)
    for k, (p, s) in enumerate(states):
        if len(s.positions) and (s.positions.min() < 0 or s.positions.max() >= n):
            raise RunStateError(f"{p.name} covers positions outside the run's {n} examples")
        taken = owner[s.positions] >= 0
        if taken.any() or len(np.unique(s.positions)) != len(s.positions):
            other = files[owner[s.positions][taken][0]].name if taken.any() else p.name
            raise RunStateError(f"{p.name} and {other} cover the same examples (overlapping shards)",
                                hint="keep one split: delete the shard files of the other one")
        owner[s.positions] = k
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        counts = sorted({s.shard_count for _, s in states})
        raise RunStateError(f"{len(missing)} of {n} examples are in no finished shard (first missing position "
                            f"{int(missing[0])}; shards present: {[p.name for p in files]})",
                            hint=f"run every shard of the split (K={counts[0] if len(counts) == 1 else counts}), "
                                 "then merge again")
    n_stages = states[0][1].n_stages
    clean_correct = np.zeros(n, bool)
    robust = np.zeros(n, bool)
    broken_by = np.full(n, -1, np.int16)
    clean_pred = np.full(n, -1, np.int64)
    adv_pred = np.full(n, -1, np.int64)
    x_adv = None
    for _, s in states:
        for name, target in (("clean_correct", clean_correct), ("robust", robust), ("broken_by", broken_by),
                             ("clean_pred", clean_pred), ("adv_pred", adv_pred)):
            target[s.positions] = getattr(s, name)
        if x_adv is None:
            x_adv = np.zeros((n, *s.x_adv.shape[1:]), np.float32)
        x_adv[s.positions] = s.x_adv
    fooled = np.flatnonzero(broken_by >= 0)
    per_example = PerExample(indices=np.asarray(indices, np.int64), clean_correct=clean_correct, robust=robust,
                             broken_by=broken_by, clean_pred=clean_pred, adv_pred=adv_pred, adv_positions=fooled,
                             x_adv=x_adv[fooled])
    per_example.check(f"merged shards of {run_dir}")

    def total(attr: str) -> list:
        return [sum(getattr(s, attr)[i] for _, s in states) for i in range(n_stages)]

    return Merged(per_example=per_example, clean_seconds=sum(s.clean_seconds for _, s in states),
                  stage_seconds=total("stage_seconds"), forward_images=total("forward_images"),
                  backward_images=total("backward_images"), rejected=total("rejected"), shard_count=len(states),
                  zero_gradients=[None if any(s.zero_gradients[i] is None for _, s in states)
                                  else sum(s.zero_gradients[i] for _, s in states) for i in range(n_stages)],
                  preflight=[s.preflight for _, s in states if s.preflight is not None])
