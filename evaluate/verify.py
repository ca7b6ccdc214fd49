"""The checks every result passes before it is written: adversarial images inside the threat model, and an
fp32 forward that reproduces every clean and robust flag (near-ties excepted, and reported)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .integrity import ball_problems, perturbation_norms  # noqa: F401 (perturbation_norms: re-exported)
from .precision import strict_fp32
from .prepare import Setup
from .record import PerExample

log = logging.getLogger("zoo.evaluate")

TIE_TOLERANCE = 1e-5          # logit margins this small may flip with the batch composition


class AdversarialCheckError(RuntimeError):
    """Adversarial examples that break the threat model or do not reproduce the claimed robust flags.

    Not a ZooError: no user input causes it (it means a bug in an engine, a non-deterministic model or a run
    folder of another model), so the CLIs keep its traceback.
    """


def check_adversarial(per_example: PerExample, x_clean: np.ndarray, norm: str, eps: float,
                      tolerance: float = 1e-6) -> None:
    """Every stored adversarial image is finite, inside [0, 1] and within eps of its clean image.

    The tolerance is ``tolerance * max(1, eps)``: absolute for the usual Linf/L2 radii, relative for the
    large L1 radius where float32 sums over 3072 pixels round by more than 1e-6.
    """
    problems = ball_problems(per_example.x_adv, per_example.adv_positions, x_clean, norm, eps, tolerance)
    if problems:
        raise AdversarialCheckError("adversarial examples fail validation: " + "; ".join(problems)
                                    + " (a bug in the attack engine: no result was written)")


def verify_predictions(setup: Setup, per_example: PerExample) -> list[dict[str, Any]]:
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
        found_bad, found_ties = disagreements(setup, images, torch.from_numpy(claimed), per_example.indices)
        bad += [dict(item, flag=what) for item in found_bad]
        ties += [dict(item, flag=what) for item in found_ties]
    if bad:
        raise AdversarialCheckError(
            f"an fp32 forward pass does not reproduce the clean/robust flags of {len(bad)} example(s) "
            f"(first: {bad[:3]}); a bug in the attack engine, a non-deterministic model, or a run folder of "
            "another model: no result was written")
    if ties:
        log.warning("%d example(s) sit on a decision tie (|margin| <= %g); their flags may depend on the batch: %s",
                    len(ties), TIE_TOLERANCE, ties[:5])
    return ties


def disagreements(setup: Setup, x: torch.Tensor, claimed: torch.Tensor, indices: np.ndarray
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(real disagreements, near-ties) between ``claimed`` correctness flags and an fp32 forward on ``x``."""
    dev, B, y = setup.device, setup.opts.batch_size, setup.data.y
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
