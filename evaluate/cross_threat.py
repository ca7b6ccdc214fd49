"""Any checkpoint under any threat: which registry variant a run evaluates when the threat differs.

A registry model has one checkpoint per (dataset, trained threat). ``--threat`` says what the run evaluates,
``--trained-threat`` which checkpoint. Without it: the checkpoint trained for the evaluated threat when there
is one, else the data set's only checkpoint (the registry's SCORE checkpoints are Linf-trained, so ``--threat
l2`` picks the Linf one); with several and none for the evaluated threat, the run asks. Records carry
``trained_threat``; leaderboards never rank a cross-threat row among models trained for that threat
(report/leaderboard.py). Pure Python.
"""

from __future__ import annotations

from typing import Any

from zoo.errors import UnknownVariantError


def pick_variant(info: Any, dataset: str, threat: str, trained_threat: str | None) -> Any:
    """The registry ``Variant`` of ``info`` (a zoo.registry.ModelInfo) a run of ``threat`` on ``dataset`` loads."""
    if trained_threat is not None:
        return info.variant(dataset, trained_threat)
    on_dataset = [v for v in info.variants if v.dataset == dataset]
    same = [v for v in on_dataset if v.threat == threat]
    if same:
        return same[0]
    if len(on_dataset) == 1:
        return on_dataset[0]
    have = ", ".join(v.threat for v in on_dataset) or "none"
    raise UnknownVariantError(
        f"{info.name} has no {dataset} checkpoint trained for {threat} (trained for: {have})",
        hint=f"pass --trained-threat {on_dataset[0].threat if on_dataset else 'linf'} to evaluate that checkpoint "
             f"under {threat}" if on_dataset else "pick another --dataset")
