"""The typed result record: what one evaluation run produced, as written to results/.

Layout on disk: ``results/<dataset>/<threat>/<model>/<run-id>.json`` plus ``<run-id>.npz`` holding the
per-example arrays (see results/README.md). Writers and readers both go through this module so the
schema lives in one place; ``RunRecord.from_dict`` rejects anything malformed with a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import BadInputError
from zoo.fileio import atomic_write_text

SCHEMA_VERSION = 1


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

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "percent": self.percent}


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
    threat: str                   # linf | l2 | l1
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

    @property
    def n_ex(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Accuracy):
                value = value.to_dict()
            elif f.name == "stages":
                value = [s.to_dict() for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["n_ex"] = self.n_ex
        return out

    @classmethod
    def from_dict(cls, data: Any, origin: str = "record") -> "RunRecord":
        if not isinstance(data, dict):
            raise BadInputError(f"{origin}: not a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise BadInputError(f"{origin}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise BadInputError(f"{origin}: missing field(s) {missing}")
        unknown = sorted(set(data) - names - {"schema_version", "n_ex"})
        if unknown:
            raise BadInputError(f"{origin}: unknown field(s) {unknown}")
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
            record = cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{origin}: malformed record ({type(exc).__name__}: {exc})") from None
        record.validate(origin)
        return record

    def validate(self, origin: str = "record") -> None:
        problems = []
        if self.clean.total != self.n_ex or self.robust.total != self.n_ex:
            problems.append("accuracy totals differ from the number of indices")
        if self.robust.correct > self.clean.correct:
            problems.append("more robust than clean points")
        if not 0 < self.eps_value:
            problems.append("eps must be positive")
        if self.complete and [s.attack for s in self.stages] != list(self.attacks)[: len(self.stages)]:
            problems.append("stages do not follow the attack order")
        if problems:
            raise BadInputError(f"{origin}: inconsistent record: " + "; ".join(problems))

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: cannot read result record ({exc})") from None
        return cls.from_dict(data, origin=str(path))

    def relative_path(self) -> Path:
        """Where this record lives under a results root."""
        return Path(self.dataset) / self.threat / self.model / f"{self.run_id}.json"

    def write(self, results_root: str | Path) -> Path:
        path = Path(results_root) / self.relative_path()
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _accuracy(raw: Any) -> Accuracy:
    return Accuracy(correct=int(raw["correct"]), total=int(raw["total"]))
