"""Helpers that build RunRecord fixtures for the report tests, plus the record-schema checks they rely on.

Records are built as real ``RunRecord`` objects and written with ``.write(root)``, so every fixture goes
through the same schema code as the runner's output.
"""

from __future__ import annotations

import os
from pathlib import Path


from zoo.evaluate.record import Accuracy, RunRecord, Stage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "report"
UPDATE_GOLDEN_ENV = "SCORE_ZOO_UPDATE_GOLDEN"  # set to 1 to rewrite the golden files from the current code
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def make_record(model: str = "score-wrn-28-10", dataset: str = "cifar10", threat: str = "linf",
                eps: str = "8/255", clean: int = 8861, robust: int = 6104, n: int = 10000,
                stages: tuple[int, ...] | None = None, run_id: str | None = None,
                created: str = "2025-01-01T00:00:00+00:00", complete: bool = True, version: str = "standard",
                seed: int = 0, provenance: str | None = "pinned") -> RunRecord:
    """A consistent record; ``stages`` are the robust counts after each standard attack (default: a
    plausible decreasing sequence ending at ``robust``); ``provenance``: the checkpoint's (default a pinned
    release; None for a record older than provenance)."""
    from zoo.domain import parse_eps

    if stages is None:
        stages = (robust + 3 * (robust // 100 + 1), robust + (robust // 100 + 1), robust, robust)
    return RunRecord(
        run_id=run_id or f"{model}-{dataset}-{eps.replace('/', '_')}-{created[:10]}",
        model=model, dataset=dataset, threat=threat, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[threat],
        eps=eps, eps_value=parse_eps(eps), version=version, attacks=STANDARD_ATTACKS[: len(stages)] if complete
        else STANDARD_ATTACKS, seed=seed, indices=tuple(range(n)), clean=Accuracy(clean, n),
        robust=Accuracy(robust, n),
        stages=tuple(Stage(attack=a, robust=Accuracy(c, n), seconds=1.5 * (i + 1))
                     for i, (a, c) in enumerate(zip(STANDARD_ATTACKS, stages))),
        engine="pyautoattack", precision="fp32", batch_size=500, libraries={"torch": "2.4.1", "autoattack": "0.2.0"},
        device="fixture", checkpoint={"source": "fixture", "sha256": "ab" * 32, "path": "fixture.pt",
                                      **({} if provenance is None else {"provenance": provenance})},
        data={"source": "file", "path": "fixture.npz", "sha256": "cd" * 32}, config_hash="0" * 16,
        created=created, complete=complete)


def make_corruptions_record(model: str = "score-wrn-28-10", dataset: str = "cifar10", n: int = 10000,
                            clean: int = 8861, base: int = 8000, trained_threat: str | None = "linf",
                            run_id: str | None = None, created: str = "2025-01-02T00:00:00+00:00") -> RunRecord:
    """A consistent --threat corruptions record: set (c, s) has ``base - 40 c - 300 s`` right (clamped)."""
    from zoo.evaluate.corruptions_data import CORRUPTIONS

    sets = {c: tuple(Accuracy(max(0, min(n, base * n // 10000 - 40 * ci - 300 * s)), n) for s in range(5))
            for ci, c in enumerate(CORRUPTIONS)}
    total = sum(a.correct for accs in sets.values() for a in accs)
    return RunRecord(
        run_id=run_id or f"{model}-{dataset}-corruptions-{created[:10]}", model=model, dataset=dataset,
        threat="corruptions", norm="", eps="", eps_value=0.0, version="corruptions", attacks=(), seed=0,
        indices=tuple(range(n)), clean=Accuracy(clean, n), robust=Accuracy(total, n * 75), stages=(),
        engine="forward pass", precision="fp32", batch_size=500, libraries={"torch": "2.4.1"}, device="fixture",
        checkpoint={"source": "fixture", "sha256": "ab" * 32, "path": "fixture.pt"},
        data={"source": "file", "path": "fixture.npz", "sha256": "cd" * 32}, config_hash="0" * 16,
        created=created, complete=True, kind="corruptions", trained_threat=trained_threat, corruptions=sets)


def check_golden(name: str, text: str) -> None:
    """Byte-for-byte comparison with tests/fixtures/report/<name> (rewritten when UPDATE_GOLDEN_ENV=1)."""
    path = FIXTURES / name
    if os.environ.get(UPDATE_GOLDEN_ENV) == "1":
        path.write_bytes(text.encode("utf-8"))
    assert path.exists(), f"golden file {path} missing: run with {UPDATE_GOLDEN_ENV}=1 to create it"
    assert text.encode("utf-8") == path.read_bytes(), f"output differs from golden file {name}"
