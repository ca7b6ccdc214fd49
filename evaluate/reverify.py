"""``zoo-eval verify RECORD``: re-run the model on a record's stored adversarial and clean images.

Beyond the readers' integrity check (``integrity.check_record``: the record against itself and its ``.npz``),
this rebuilds the run's model and data from the invocation sealed in the record, checks that they are the
ones the run used (same configuration hash: checkpoint sha256, data content, indices, ...), then confirms
with an fp32 forward pass every clean flag and every fooled point (its stored adversarial image is inside the
eps ball of its clean image and the model misclassifies it), and that every point claimed robust is still
classified correctly on its clean image. Records of in-memory modules need the module:
``zoo.evaluate.verify_record(path, model=the_module)``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import BadInputError, RecordError

from .integrity import LEGACY_NOTE, ball_problems
from .options import RunOptions
from .prepare import prepare
from .record import RunRecord
from .state import config_differences
from .verify import disagreements


@dataclass(frozen=True)
class Verified:
    record: RunRecord
    fooled: int                      # fooled points re-checked
    examples: int                    # clean flags re-checked
    ties: list[dict[str, Any]]       # near-ties (|margin| tiny) whose flag the forward pass could not settle

    def summary(self, path: str | Path) -> str:
        r = self.record
        text = (f"{path}: verified: the clean flags of all {self.examples} examples reproduced; "
                f"{self.fooled} fooled point(s) inside the {r.norm} ball of {r.eps} and misclassified; "
                f"{r.robust.correct} robust point(s) still classified correctly")
        if self.ties:
            text += f" ({len(self.ties)} near-tie(s) accepted: {self.ties[:3]})"
        return text


def verify_record(path: str | Path, model: nn.Module | None = None,
                  device: str | torch.device | None = None) -> Verified:
    """Re-check a record with its model; RecordError naming the record and the mismatch when it fails."""
    path = Path(path)
    # the integrity check first, record vs itself and its .npz; the eps ball is checked below, on the
    # clean images rebuilt from the invocation
    record, pe = RunRecord.read_with_arrays(path, eps_ball=False)
    if record.integrity is None:
        raise RecordError(f"{path}: {LEGACY_NOTE}, so the run cannot be rebuilt to verify it",
                          hint="re-run the evaluation with this version of zoo-eval")
    inv = record.integrity.get("invocation")
    if not isinstance(inv, dict) or "model" not in inv or "model_kind" not in inv:
        raise RecordError(f"{path}: the record holds no usable invocation to rebuild the run")
    if inv["model_kind"] == "module" and model is None:
        raise BadInputError(f"{path} was evaluated from Python with an in-memory module ({inv['model']}); "
                            "the command line cannot rebuild it",
                            hint="verify it from Python: zoo.evaluate.verify_record(path, model=the_module)")
    config = record.integrity["config"]
    with tempfile.TemporaryDirectory(prefix="zoo-verify-") as scratch:   # prepare writes nothing there
        try:
            options = RunOptions.from_invocation(inv, results_dir=scratch, run_dir=scratch, progress=False,
                                                 shard=(0, int(config.get("shards", 1))),
                                                 **({} if device is None else {"device": device}))
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path}: the record's invocation cannot be rebuilt ({exc})") from None
        setup = prepare(model if model is not None else inv["model"], options, attacking=False)
    if setup.config_hash != record.config_hash:
        diff = config_differences(config, setup.config)
        raise RecordError(f"{path}: the model and data rebuilt now are not the ones the run used (differs in: "
                          f"{', '.join(diff) or 'the configuration hash'})",
                          hint="verify with the same checkpoint, data and library versions as the run")
    x_clean = setup.data.x
    problems = ball_problems(pe.x_adv, pe.adv_positions, x_clean.numpy(), setup.norm, setup.eps)
    x_adv = x_clean.clone()
    if len(pe.adv_positions):
        x_adv[torch.from_numpy(pe.adv_positions)] = torch.from_numpy(pe.x_adv)
    ties = []
    for what, images, claimed in (("clean", x_clean, pe.clean_correct), ("robust", x_adv, pe.robust)):
        bad, near = disagreements(setup, images, torch.from_numpy(claimed), pe.indices)
        ties += [dict(item, flag=what) for item in near]
        if bad:
            problems.append(f"an fp32 forward pass does not reproduce the {what} flags of {len(bad)} example(s) "
                            f"(first: {bad[:3]})")
    if problems:
        raise RecordError(f"{path}: verification failed: " + "; ".join(problems))
    return Verified(record=record, fooled=len(pe.adv_positions), examples=len(pe.indices), ties=ties)
