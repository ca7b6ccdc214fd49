"""Resumable run state: the run's configuration (``config.json``) and one ``.npz`` per shard.

The shard file is rewritten atomically (temp + rename) after every chunk of batches, so a killed run loses
at most one chunk. It stores the robust set at the start of the current stage: that set fixes the batch
plan (AutoAttack cuts the sorted robust indices into consecutive batches), so a resumed run rebuilds the
very same batches and skips the ones already done.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import RunStateError
from zoo.fileio import atomic_write_bytes, utc_timestamp

STATE_VERSION = 1
CONFIG_FILE = "config.json"
CLEAN_STAGE = -1  # stage index while the clean predictions are not done yet


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that can change a result."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the fields in which two configurations differ (for error messages)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def start_run_folder(run_dir: Path, config: dict[str, Any], digest: str, invocation: dict[str, Any]) -> dict[str, Any]:
    """The run folder's config.json (written by the first process, read by the others): the configuration, the
    saved invocation, and the run id (start time plus the hash's first digits) that names the record."""
    created = utc_timestamp()
    stamp = created.replace("-", "").replace(":", "").replace("+0000", "")[:15]
    return write_config_once(run_dir, {"config": config, "config_hash": digest, "invocation": invocation,
                                       "created": created, "run_id": f"{stamp}-{digest[:8]}"})


def write_config_once(run_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Create ``run_dir/config.json`` unless it exists; return the document that is on disk.

    Shard processes start at the same time: the file is created with ``os.link`` (fails if present), so
    exactly one process writes it and every other one reads that same document (same run id, same start).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(document, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    existing = read_config(run_dir)
    if existing["config_hash"] != document["config_hash"]:
        diff = config_differences(existing["config"], document["config"])
        raise RunStateError(
            f"run folder {run_dir} belongs to a different evaluation (differs in: {', '.join(diff) or 'hash'}); "
            "refusing to resume it",
            hint="re-run with exactly the settings it was started with, or use another --run-dir")
    return existing


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStateError(f"{run_dir} is not a zoo-eval run folder (no {CONFIG_FILE})",
                            hint="pass the folder printed as 'run folder' when the run started") from None
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{path} is unreadable ({exc})", hint="delete the run folder to start over") from None
    if not isinstance(doc, dict) or not {"config", "config_hash", "invocation", "run_id"} <= set(doc):
        raise RunStateError(f"{path} is not a zoo-eval run configuration",
                            hint="delete the run folder to start over")
    if config_hash(doc["config"]) != doc["config_hash"]:
        raise RunStateError(f"{path} was edited: its configuration no longer matches its hash",
                            hint="delete the run folder to start over")
    return doc


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:03d}-of-{count:03d}.npz"


@dataclass
class ShardState:
    """Progress of one shard (the whole run when not sharded), positions relative to the run's index list."""

    config_hash: str
    shard_index: int
    shard_count: int
    positions: np.ndarray                     # (n,) int64: which of the run's examples this shard holds
    n_stages: int
    stage: int = CLEAN_STAGE                  # -1 clean pass, 0..n_stages-1 attack, n_stages done
    batches_done: int = 0                     # within the current stage
    clean_pred: np.ndarray | None = None      # (n,) int64, -1 until predicted
    clean_correct: np.ndarray | None = None   # (n,) bool
    robust: np.ndarray | None = None          # (n,) bool
    broken_by: np.ndarray | None = None       # (n,) int16, -1 = not fooled
    adv_pred: np.ndarray | None = None        # (n,) int64, -1 = not fooled
    stage_start_robust: np.ndarray | None = None  # (n,) bool: fixes the current stage's batch plan
    x_adv: np.ndarray | None = None           # (n, C, H, W) float32 in memory; only fooled rows are saved
    clean_seconds: float = 0.0
    stage_seconds: list[float] = field(default_factory=list)
    forward_images: list[int] = field(default_factory=list)
    backward_images: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)  # claimed successes an fp32 forward did not confirm
    zero_gradients: list[int | None] = field(default_factory=list)  # points with zero APGD gradient; None: not counted
    preflight: dict[str, Any] | None = None   # checks.measure_model on the shard's first batch, once clean is done

    @classmethod
    def new(cls, config_hash_: str, shard_index: int, shard_count: int, positions: np.ndarray, n_stages: int,
            image_shape: tuple[int, ...]) -> "ShardState":
        n = len(positions)
        return cls(config_hash=config_hash_, shard_index=shard_index, shard_count=shard_count,
                   positions=np.asarray(positions, dtype=np.int64), n_stages=n_stages,
                   clean_pred=np.full(n, -1, np.int64), clean_correct=np.zeros(n, bool),
                   robust=np.zeros(n, bool), broken_by=np.full(n, -1, np.int16), adv_pred=np.full(n, -1, np.int64),
                   stage_start_robust=np.zeros(n, bool), x_adv=np.zeros((n, *image_shape), np.float32),
                   stage_seconds=[0.0] * n_stages, forward_images=[0] * n_stages,
                   backward_images=[0] * n_stages, rejected=[0] * n_stages, zero_gradients=[None] * n_stages)

    @property
    def done(self) -> bool:
        return self.stage >= self.n_stages

    def _meta(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "config_hash": self.config_hash, "shard_index": self.shard_index,
                "shard_count": self.shard_count, "n_stages": self.n_stages, "stage": self.stage,
                "batches_done": self.batches_done, "clean_seconds": self.clean_seconds,
                "stage_seconds": self.stage_seconds, "forward_images": self.forward_images,
                "backward_images": self.backward_images, "rejected": self.rejected,
                "zero_gradients": self.zero_gradients, "preflight": self.preflight}

    def to_bytes(self) -> bytes:
        fooled = np.flatnonzero(self.broken_by >= 0)
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(self._meta())), positions=self.positions,
                 clean_pred=self.clean_pred, clean_correct=self.clean_correct, robust=self.robust,
                 broken_by=self.broken_by, adv_pred=self.adv_pred, stage_start_robust=self.stage_start_robust,
                 adv_positions=fooled, x_adv=self.x_adv[fooled], image_shape=np.array(self.x_adv.shape[1:]))
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.to_bytes())

    @staticmethod
    def is_finished(path: str | Path) -> bool:
        """Whether the state file at ``path`` exists, is readable and has every stage done.

        Reads only the small ``meta`` member (not the adversarial images), so waiting ranks can poll cheaply;
        a file being replaced right now counts as not finished.
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
            return meta.get("state_version") == STATE_VERSION and meta["stage"] >= meta["n_stages"]
        except Exception:  # absent, truncated, mid-replacement
            return False

    @classmethod
    def load(cls, path: str | Path) -> "ShardState":
        path = Path(path)
        fix = f"delete {path} to redo this shard from the start"
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(str(arrays.pop("meta")))
        except Exception as exc:  # truncated zip, bad JSON, missing key
            raise RunStateError(f"run state {path} is unreadable ({type(exc).__name__}: {exc})", hint=fix) from None
        if meta.get("state_version") != STATE_VERSION:
            raise RunStateError(f"run state {path} has state_version {meta.get('state_version')!r}, "
                                f"expected {STATE_VERSION}", hint=fix)
        try:
            n = len(arrays["positions"])
            x_adv = np.zeros((n, *(int(s) for s in arrays["image_shape"])), np.float32)
            x_adv[arrays["adv_positions"]] = arrays["x_adv"]
            state = cls(config_hash=meta["config_hash"], shard_index=meta["shard_index"],
                        shard_count=meta["shard_count"], positions=arrays["positions"], n_stages=meta["n_stages"],
                        stage=meta["stage"], batches_done=meta["batches_done"], clean_pred=arrays["clean_pred"],
                        clean_correct=arrays["clean_correct"], robust=arrays["robust"],
                        broken_by=arrays["broken_by"], adv_pred=arrays["adv_pred"],
                        stage_start_robust=arrays["stage_start_robust"], x_adv=x_adv,
                        clean_seconds=meta["clean_seconds"], stage_seconds=list(meta["stage_seconds"]),
                        forward_images=list(meta["forward_images"]), backward_images=list(meta["backward_images"]),
                        rejected=list(meta["rejected"]),
                        # state files written before the reliability checks: not counted, not measured
                        zero_gradients=list(meta.get("zero_gradients", [None] * meta["n_stages"])),
                        preflight=meta.get("preflight"))
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise RunStateError(f"run state {path} is malformed ({type(exc).__name__}: {exc})", hint=fix) from None
        problem = state.inconsistency()
        if problem:
            raise RunStateError(f"run state {path} is malformed ({problem})", hint=fix)
        return state

    def inconsistency(self) -> str | None:
        """What makes this state impossible (a hand-edited or foreign file), or None."""
        n = len(self.positions)
        if not isinstance(self.n_stages, int) or self.n_stages < 0:
            return f"n_stages = {self.n_stages!r}"
        if not isinstance(self.stage, int) or not CLEAN_STAGE <= self.stage <= self.n_stages:
            return f"stage = {self.stage!r}, outside {CLEAN_STAGE}..{self.n_stages}"
        if not isinstance(self.batches_done, int) or self.batches_done < 0:
            return f"batches_done = {self.batches_done!r}"
        per_stage = ("stage_seconds", "forward_images", "backward_images", "rejected", "zero_gradients")
        if any(len(getattr(self, name)) != self.n_stages for name in per_stage):
            return "per-stage lists do not have one entry per stage"
        per_example = ("clean_pred", "clean_correct", "robust", "broken_by", "adv_pred", "stage_start_robust")
        if any(getattr(self, name).shape != (n,) for name in per_example):
            return "per-example arrays do not have one entry per example"
        if len(self.broken_by) and (self.broken_by.min() < -1 or self.broken_by.max() >= self.n_stages):
            return "broken_by names a stage that does not exist"
        return None
