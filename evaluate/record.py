"""The typed result record: what one evaluation run produced, as written to results/.

Layout on disk: ``results/<dataset>/<threat>/<model>/<run-id>.json`` plus ``<run-id>.npz`` holding the
per-example arrays (see results/README.md). Writers and readers both go through this module so the
schema lives in one place; ``RunRecord.from_dict`` rejects anything malformed with a message naming it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import BadInputError, RecordError
from zoo.fileio import atomic_write_bytes, atomic_write_text

from .stats import clopper_pearson

SCHEMA_VERSION = 2
#: Versions still read: 1 (before corruptions records, trained_threat, the reliability checks and the
#: integrity seal) reads with their defaults.
READABLE_SCHEMA_VERSIONS = (1, 2)
#: What a record measured: robust accuracy under AutoAttack, or accuracy on common corruptions.
KINDS = ("autoattack", "corruptions")

log = logging.getLogger("zoo.evaluate")


def percent(count: int, total: int) -> float:
    """Accuracy in percent rounded to 2 decimals, as RobustBench reports it."""
    return round(100.0 * count / total, 2) if total else 0.0


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def percent(self) -> float:
        return percent(self.correct, self.total)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The exact 95% (Clopper-Pearson) interval in percent, 2 decimals; None without examples."""
        if not self.total:
            return None
        lo, hi = clopper_pearson(self.correct, self.total)
        return round(100 * lo, 2), round(100 * hi, 2)

    def to_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {"correct": self.correct, "total": self.total, "percent": self.percent,
                "interval95": None if interval is None else list(interval)}


@dataclass(frozen=True)
class Stage:
    """Robust accuracy after one attack of the sequence (cumulative), and what it cost."""

    attack: str
    robust: Accuracy
    seconds: float
    forward_passes: int | None = None
    backward_passes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "robust": self.robust.to_dict(), "seconds": round(self.seconds, 3),
                "forward_passes": self.forward_passes, "backward_passes": self.backward_passes}


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    model: str                    # registry name, or a user label for custom modules
    dataset: str                  # cifar10 | cifar100 | custom
    threat: str                   # linf | l2 | l1 | corruptions
    norm: str                     # AutoAttack spelling: Linf | L2 | L1
    eps: str                      # as given, e.g. "8/255"
    eps_value: float
    version: str                  # standard | plus | rand | custom
    attacks: tuple[str, ...]
    seed: int
    indices: tuple[int, ...]      # example indices into the data set, in order
    clean: Accuracy
    robust: Accuracy
    stages: tuple[Stage, ...]
    engine: str
    precision: str
    batch_size: int
    libraries: dict[str, str]
    device: str
    checkpoint: dict[str, Any]    # {"source": ..., "sha256": ..., "path": ...}
    data: dict[str, Any]          # {"source": "torchvision"|"file", "path": ..., "sha256": ...}
    config_hash: str
    created: str                  # ISO 8601 UTC
    complete: bool = True
    per_example_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # schema 2:
    kind: str = "autoattack"
    trained_threat: str | None = None   # the threat the checkpoint was trained for (None: not a registry model)
    # kind corruptions: {corruption: [Accuracy of severity 1..5]}, RobustBench's order; ``robust`` is their mean
    corruptions: dict[str, tuple[Accuracy, ...]] | None = None
    # the seal checked by every reader (see integrity.py): per_example_sha256, config, invocation; None in
    # records written before it existed
    integrity: dict[str, Any] | None = None
    checks: dict[str, Any] | None = None   # reliability checks (evaluate/checks.py); None in version-1 records

    @property
    def n_ex(self) -> int:
        return len(self.indices)

    @property
    def unreliable(self) -> bool:
        """The checks' verdict (README: "Reliability checks"); False for records without checks."""
        return bool(self.checks and self.checks.get("unreliable"))

    @property
    def unreliable_because(self) -> list[str]:
        return list(self.checks.get("because", [])) if self.unreliable else []

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "integrity" and value is None:
                continue
            if isinstance(value, Accuracy):
                value = value.to_dict()
            elif f.name == "stages":
                value = [s.to_dict() for s in value]
            elif f.name == "corruptions" and value is not None:
                value = {c: [a.to_dict() for a in accs] for c, accs in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["n_ex"] = self.n_ex
        return out

    @classmethod
    def from_dict(cls, data: Any, origin: str = "record") -> "RunRecord":
        if not isinstance(data, dict):
            raise RecordError(f"{origin}: not a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
            raise RecordError(f"{origin}: schema_version {version!r}, expected one of {READABLE_SCHEMA_VERSIONS}")
        names = {f.name for f in dataclasses.fields(cls)} - (_SCHEMA2_FIELDS if version == 1 else set())
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise RecordError(f"{origin}: missing field(s) {missing}")
        unknown = sorted(set(data) - names - {"schema_version", "n_ex"})
        if unknown:
            raise RecordError(f"{origin}: unknown field(s) {unknown}")
        wrong = [f"{k} must be {_FIELD_TYPES[k][1]}" for k in _FIELD_TYPES
                 if k in data and not _is_type(data[k], _FIELD_TYPES[k][0])]
        if wrong:
            raise RecordError(f"{origin}: wrongly typed field(s): " + "; ".join(wrong))
        try:
            datetime.fromisoformat(data["created"])
        except ValueError:
            raise RecordError(f"{origin}: 'created' is not an ISO 8601 time ({data['created']!r})") from None
        try:
            kwargs = {k: data[k] for k in names if k in data}
            kwargs["clean"] = _accuracy(data["clean"])
            kwargs["robust"] = _accuracy(data["robust"])
            kwargs["stages"] = tuple(
                Stage(attack=s["attack"], robust=_accuracy(s["robust"]), seconds=float(s["seconds"]),
                      forward_passes=s.get("forward_passes"), backward_passes=s.get("backward_passes"))
                for s in data["stages"])
            kwargs["attacks"] = tuple(data["attacks"])
            kwargs["indices"] = tuple(int(i) for i in data["indices"])
            if data.get("corruptions") is not None:
                kwargs["corruptions"] = {str(c): tuple(_accuracy(a) for a in accs)
                                         for c, accs in data["corruptions"].items()}
            record = cls(**kwargs)
            record.validate(origin)
        except BadInputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"{origin}: malformed record ({type(exc).__name__}: {exc})") from None
        return record

    def validate(self, origin: str = "record") -> None:
        if self.kind not in KINDS:
            raise RecordError(f"{origin}: unknown kind {self.kind!r} (expected one of {KINDS})")
        if self.kind == "corruptions":
            return self._validate_corruptions(origin)
        if self.corruptions is not None:
            raise RecordError(f"{origin}: an autoattack record with corruption accuracies")
        problems = []
        if self.clean.total != self.n_ex or self.robust.total != self.n_ex:
            problems.append("accuracy totals differ from the number of indices")
        if self.robust.correct > self.clean.correct:
            problems.append("more robust than clean points")
        if not 0 < self.eps_value:
            problems.append("eps must be positive")
        if self.complete and [s.attack for s in self.stages] != list(self.attacks)[: len(self.stages)]:
            problems.append("stages do not follow the attack order")
        counts = [self.clean.correct] + [s.robust.correct for s in self.stages]
        if any(later > earlier for earlier, later in zip(counts, counts[1:])):
            problems.append("robust counts rise from one stage to the next")
        if self.complete and self.stages and self.stages[-1].robust.correct != self.robust.correct:
            problems.append("the last stage's robust count differs from the robust accuracy")
        if problems:
            raise RecordError(f"{origin}: inconsistent record: " + "; ".join(problems))

    def _validate_corruptions(self, origin: str) -> None:
        problems = []
        sets = self.corruptions or {}
        if not sets:
            problems.append("no corruption accuracies")
        if any(len(accs) != 5 for accs in sets.values()):
            problems.append("every corruption needs 5 severities")
        if any(a.total != self.n_ex or not 0 <= a.correct <= a.total for accs in sets.values() for a in accs):
            problems.append("a corruption accuracy does not count the record's examples")
        if sets and (self.robust.correct != sum(a.correct for accs in sets.values() for a in accs)
                     or self.robust.total != self.n_ex * 5 * len(sets)):
            problems.append("the mean corruption accuracy (robust) is not the sum over the sets")
        if self.clean.total != self.n_ex:
            problems.append("clean accuracy total differs from the number of indices")
        if problems:
            raise RecordError(f"{origin}: inconsistent corruptions record: " + "; ".join(problems))

    @property
    def cross_threat(self) -> bool:
        """A checkpoint trained for one threat evaluated under another (``trained_threat`` set and different)."""
        return self.trained_threat not in (None, self.threat)

    @property
    def corruption_percent(self) -> dict[str, list[float]]:
        """{corruption: [accuracy in % of severity 1..5]} (corruptions records; empty otherwise)."""
        return {c: [a.percent for a in accs] for c, accs in (self.corruptions or {}).items()}

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        """The record at ``path``, checked against itself and its ``.npz`` (``integrity.check_record``);
        notes (e.g. a record older than the integrity fields) go to the ``zoo.evaluate`` log."""
        record, notes = cls.read_checked(path)
        for note in notes:
            log.warning("%s", note)
        return record

    @classmethod
    def read_checked(cls, path: str | Path) -> tuple["RunRecord", list[str]]:
        """``read``, returning the integrity notes instead of logging them (the reports list them)."""
        record, notes, _arrays = cls._read(path)
        return record, notes

    @classmethod
    def read_with_arrays(cls, path: str | Path, *, eps_ball: bool = True) -> tuple["RunRecord", "PerExample"]:
        """An AutoAttack record and its per-example arrays, the ``.npz`` read and checked once (``read``
        then ``PerExample.read`` would check it twice). ``eps_ball``: see ``integrity.check_record``."""
        path = Path(path)
        record, notes, arrays = cls._read(path, eps_ball=eps_ball)
        for note in notes:
            log.warning("%s", note)
        if record.kind != "autoattack":
            raise BadInputError(f"{path} is a {record.kind} run: it has no adversarial examples",
                                hint="zoo-report plot corruptions RECORD draws its accuracy per corruption and "
                                "severity")
        if arrays is None:   # a record older than the seal: its arrays are checked on their own
            npz = per_example_path(path)   # <run-id>.npz beside it (an unsealed record's own name is unchecked)
            if not npz.is_file():
                raise RecordError(f"{path}: its per-example arrays {npz} are missing",
                                  hint="keep <run-id>.npz beside <run-id>.json (zoo-eval writes both)")
            arrays = PerExample.read(npz)
            if arrays.indices.tolist() != list(record.indices):
                raise RecordError(f"{npz} belongs to another run: its example indices differ from {path}'s")
        return record, arrays

    @classmethod
    def _read(cls, path: str | Path, **check: bool) -> tuple["RunRecord", list[str], "PerExample | None"]:
        from . import integrity

        path = Path(path)
        data = integrity.read_json(path)
        record = cls.from_dict(data, origin=str(path))
        notes, arrays = integrity.check_record(path, data, record, **check)
        return record, notes, arrays

    def relative_path(self) -> Path:
        """Where this record lives under a results root."""
        return Path(self.dataset) / self.threat / self.model / f"{self.run_id}.json"

    def write(self, results_root: str | Path) -> Path:
        path = Path(results_root) / self.relative_path()
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


# Scalar fields whose JSON type from_dict checks before building the record (bool is not an int here).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **{k: ((str,), "a string") for k in ("run_id", "model", "dataset", "threat", "norm", "eps", "version",
                                          "engine", "precision", "device", "config_hash", "created")},
    "eps_value": ((int, float), "a number"),
    "seed": ((int,), "an integer"),
    "batch_size": ((int,), "an integer"),
    "complete": ((bool,), "true or false"),
    "kind": ((str,), "a string"),
    "trained_threat": ((str, type(None)), "a string or null"),
    "corruptions": ((dict, type(None)), "an object or null"),
    "per_example_file": ((str, type(None)), "a string or null"),
    "integrity": ((dict, type(None)), "an object or null"),
    "checks": ((dict, type(None)), "an object or null"),
    **{k: ((dict,), "an object") for k in ("libraries", "checkpoint", "data", "extra", "clean", "robust")},
    **{k: ((list,), "a list") for k in ("attacks", "indices", "stages")},
}


_SCHEMA2_FIELDS = {"kind", "trained_threat", "corruptions", "checks", "integrity"}


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _accuracy(raw: Any) -> Accuracy:
    return Accuracy(correct=int(raw["correct"]), total=int(raw["total"]))


# ---------------------------------------------------------------- per-example arrays (<run-id>.npz)

PER_EXAMPLE_KEYS = ("indices", "clean_correct", "robust", "broken_by", "clean_pred", "adv_pred",
                    "adv_positions", "x_adv")


@dataclass(frozen=True)
class PerExample:
    """What happened to each example, in the order of ``RunRecord.indices``.

    ``broken_by[i]`` is the position in ``RunRecord.attacks`` of the attack that first fooled example i
    (-1: never fooled, or not correctly classified to begin with). ``x_adv`` holds the adversarial images
    of the fooled examples only, in the order of ``adv_positions`` (positions into ``indices``); every other
    example's adversarial image is its clean image. ``adv_pred`` is the model's label on the adversarial
    image (-1 where none was found).
    """

    indices: np.ndarray        # (n,) int64, data-set indices
    clean_correct: np.ndarray  # (n,) bool
    robust: np.ndarray         # (n,) bool
    broken_by: np.ndarray      # (n,) int16
    clean_pred: np.ndarray     # (n,) int64
    adv_pred: np.ndarray       # (n,) int64
    adv_positions: np.ndarray  # (m,) int64, increasing
    x_adv: np.ndarray          # (m, C, H, W) float32 in [0, 1]
    config_hash: str | None = None   # the run's configuration hash (None in arrays older than it)

    def robust_after(self, stage: int) -> np.ndarray:
        """Robust flags after attack number ``stage`` (0-based) of the sequence."""
        fooled = (self.broken_by >= 0) & (self.broken_by <= stage)
        return self.clean_correct & ~fooled

    def check(self, origin: str = "per-example arrays") -> None:
        """Internal consistency; raises BadInputError naming the first problem."""
        n = len(self.indices)
        problems = []
        for name in ("clean_correct", "robust", "broken_by", "clean_pred", "adv_pred"):
            if getattr(self, name).shape != (n,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")
        if problems:
            raise RecordError(f"{origin}: " + "; ".join(problems))
        fooled = self.broken_by >= 0
        if np.any(self.robust & ~self.clean_correct):
            problems.append("robust examples that were not clean-correct")
        if np.any(fooled & ~self.clean_correct) or np.any(fooled & self.robust):
            problems.append("broken_by set for examples that were not fooled")
        if not np.array_equal(self.robust, self.clean_correct & ~fooled):
            problems.append("robust flags disagree with clean_correct and broken_by")
        if not np.array_equal(self.adv_positions, np.flatnonzero(fooled)):
            problems.append("adv_positions are not exactly the fooled examples")
        if self.x_adv.shape[:1] != self.adv_positions.shape:
            problems.append(f"x_adv holds {self.x_adv.shape[0]} images for {len(self.adv_positions)} fooled examples")
        if problems:
            raise RecordError(f"{origin}: inconsistent per-example arrays: " + "; ".join(problems))

    def full_x_adv(self, x_clean: np.ndarray) -> np.ndarray:
        """All n adversarial images (clean image where none was found), as AutoAttack returns them."""
        out = np.array(x_clean, dtype=np.float32, copy=True)
        out[self.adv_positions] = self.x_adv
        return out

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        extra = {} if self.config_hash is None else {"config_hash": np.array(self.config_hash)}
        np.savez_compressed(buffer, schema_version=np.int64(SCHEMA_VERSION),
                            **{k: getattr(self, k) for k in PER_EXAMPLE_KEYS}, **extra)
        return buffer.getvalue()

    def write(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def read(cls, path: str | Path) -> "PerExample":
        """The arrays at ``path``, checked on their own and, when the ``<run-id>.json`` beside them is there
        (a sealed ``.npz`` requires it), against that record (``integrity.check_per_example_file``)."""
        from . import integrity

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RecordError(f"{path}: cannot read per-example arrays ({exc})") from None
        out = cls.from_bytes(data, str(path))
        integrity.check_per_example_file(path, out)
        return out

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "per-example arrays") -> "PerExample":
        """Arrays from the bytes of a ``.npz``, checked for internal consistency only."""
        from .integrity import load_arrays

        arrays = load_arrays(data, origin)
        missing = [k for k in PER_EXAMPLE_KEYS if k not in arrays]
        if missing:
            raise RecordError(f"{origin}: missing array(s) {missing}")
        stamp = arrays.get("config_hash")
        out = cls(**{k: arrays[k] for k in PER_EXAMPLE_KEYS},
                  config_hash=None if stamp is None else str(stamp))
        out.check(origin)
        return out


def per_example_path(record_path: str | Path) -> Path:
    """The ``<run-id>.npz`` written next to ``<run-id>.json``."""
    return Path(record_path).with_suffix(".npz")
