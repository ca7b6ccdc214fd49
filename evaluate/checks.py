"""Reliability checks: signs that an AutoAttack number may overstate robustness, recorded with every run.

AutoAttack's own checks (randomised outputs, probability outputs, dynamic models, class counts, points with
zero gradient, Square beating the gradient attacks) plus a few more (modules left in training mode, buffers
a forward changes, bf16 successes the fp32 re-check rejected, decision ties). Measuring is split from
judging: ``measure_model`` runs the forward passes once, before any attack, and returns plain numbers that
the run state keeps (a resumed run keeps them); the engines count zero-gradient points per attack; every
``check_*`` function turns numbers into one ``Check``. ``collect`` builds the record's ``checks`` section.

The verdict (``unreliable``) is true when any check in ``UNRELIABLE_WHEN`` warns (see the README): those
are the signs that the gradient attacks could not do their job. The others (fp32-rejected bf16 successes,
decision ties) are reported but do not change the verdict: the recorded result already takes the fp32 side.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger("zoo.evaluate")

OK, WARNING, SKIPPED = "ok", "warning", "skipped"

RANDOMIZED_REPEATS = 5
RANDOMIZED_TOLERANCE = 1e-4    # AutoAttack's: largest L2 distance between normalised repeated outputs
PROBABILITY_TOLERANCE = 1e-5   # AutoAttack's: outputs within [0, 1] and rows summing to 1 up to this
SQUARE_TOLERANCE = 0.002       # AutoAttack's: Square may lower the robust accuracy by at most 0.2 points
AUTOGRAD_CALLS = ("grad", "backward", "_make_grads")   # functions whose call inside forward() means dynamic

# checks whose warning makes the run unreliable (the README documents this rule)
UNRELIABLE_WHEN = ("randomized", "probabilities", "dynamic", "classes", "zero_gradients", "square")
RULE = ("unreliable when any of " + ", ".join(UNRELIABLE_WHEN) + " warns; fp32_rejected and decision_ties "
        "are reported only")


@dataclass(frozen=True)
class Check:
    name: str
    status: str                  # ok | warning | skipped
    reason: str                  # one line
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return self.status == WARNING

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, **self.details}


# ---------------------------------------------------------------- measuring (torch only here)


def measure_model(model, x, y) -> dict[str, Any]:
    """Plain numbers about ``model`` on one batch (the first of the run), from full-precision forwards.

    Runs under ``torch.no_grad`` except the autograd trace, which watches one forward for calls that compute
    gradients inside the model (what AutoAttack calls a dynamic defence).
    """
    import torch

    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.no_grad():
        outputs = [model(x).float() for _ in range(RANDOMIZED_REPEATS)]
    correct = [int((out.argmax(1) == y).sum()) for out in outputs]
    unit = [out / (out.norm(dim=1, keepdim=True) + 1e-10) for out in outputs]
    spread = max((float((a - b).norm(dim=1).max()) for i, a in enumerate(unit) for b in unit[i + 1:]), default=0.0)
    out = outputs[0]
    probabilities = bool(out.max() < 1 + PROBABILITY_TOLERANCE and out.min() > -PROBABILITY_TOLERANCE
                         and ((out.sum(-1) - 1).abs() < PROBABILITY_TOLERANCE).all())
    autograd_calls = _autograd_calls(model, x)
    changed = sorted(name for name, b in model.named_buffers()
                     if name in before and (b.shape != before[name].shape or not torch.equal(b, before[name])))
    training = sorted(name or type(model).__name__ for name, m in model.named_modules() if m.training)
    return {"points": int(len(x)), "repeats": RANDOMIZED_REPEATS, "output_spread": spread,
            "correct_per_repeat": correct, "probabilities": probabilities, "num_outputs": int(out.shape[-1]),
            "autograd_calls": autograd_calls, "buffers_changed": changed, "training_modules": training}


def _autograd_calls(model, x) -> int:
    """How many calls to autograd's gradient functions one forward makes (traced, like AutoAttack)."""
    import torch

    calls = 0

    def trace(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_name in AUTOGRAD_CALLS:
            calls += 1
        return None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        with torch.enable_grad():
            model(x)
    finally:
        sys.settrace(previous)
    return calls


# ---------------------------------------------------------------- judging, one function per check


def check_randomized(facts: Sequence[dict[str, Any]], version: str) -> Check:
    if version == "rand":
        return Check("randomized", SKIPPED, "version 'rand' evaluates randomised models (EOT)")
    spread = max(f["output_spread"] for f in facts)
    flips = any(len(set(f["correct_per_repeat"])) > 1 for f in facts)
    details = {"output_spread": spread, "accuracy_changes": flips}
    if flips or spread > RANDOMIZED_TOLERANCE:
        return Check("randomized", WARNING, f"repeated forwards differ (normalised outputs up to {spread:.2g} "
                     "apart): a randomised model, evaluate it with --version rand", details)
    return Check("randomized", OK, f"{RANDOMIZED_REPEATS} repeated forwards agree", details)


def check_probabilities(facts: Sequence[dict[str, Any]]) -> Check:
    if any(f["probabilities"] for f in facts):
        return Check("probabilities", WARNING, "the outputs look like probabilities (in [0, 1], rows sum to 1): "
                     "attack the logits, not softmax outputs")
    return Check("probabilities", OK, "the outputs are not probabilities")


def check_dynamic(facts: Sequence[dict[str, Any]]) -> Check:
    autograd = sum(f["autograd_calls"] for f in facts)
    buffers = sorted({b for f in facts for b in f["buffers_changed"]})
    training = sorted({m for f in facts for m in f["training_modules"]})
    details = {"autograd_calls": autograd, "buffers_changed": buffers[:20], "training_modules": training[:20]}
    problems = []
    if training:
        problems.append(f"module(s) in training mode after eval(): {', '.join(training[:3])}")
    if buffers:
        problems.append(f"a forward changes buffer(s) {', '.join(buffers[:3])}")
    if autograd:
        problems.append(f"the forward computes gradients ({autograd} autograd call(s))")
    if problems:
        return Check("dynamic", WARNING, "; ".join(problems) + ": the model changes while attacked", details)
    return Check("dynamic", OK, "eval mode throughout, no buffer changes, no gradients inside forward()", details)


def check_classes(num_outputs: int, attacks: Sequence[str], apgd_targets: int, fab_targets: int) -> Check:
    """Enough classes for the DLR losses and the target counts (a model whose outputs are not the data set's
    classes never gets here: prepare refuses it)."""
    details = {"num_outputs": num_outputs}
    problems = []
    if ("apgd-dlr" in attacks or "apgd-t" in attacks) and num_outputs <= 2:
        problems.append(f"{num_outputs} classes are too few for the DLR loss")
    elif "apgd-t" in attacks and num_outputs == 3:
        problems.append("3 classes are too few for the targeted DLR loss")
    elif "apgd-t" in attacks and apgd_targets + 1 > num_outputs:
        problems.append(f"APGD-T uses {apgd_targets} target classes, only {num_outputs - 1} exist")
    if "fab-t" in attacks and fab_targets + 1 > num_outputs:
        problems.append(f"FAB-T uses {fab_targets} target classes, only {num_outputs - 1} exist")
    if problems:
        return Check("classes", WARNING, "; ".join(problems), details)
    return Check("classes", OK, f"{num_outputs} classes suit the attacks", details)


def check_zero_gradients(attacks: Sequence[str], counts: Sequence[int | None]) -> Check:
    """Points whose initial DLR gradient is exactly zero, per attack (AutoAttack checks APGD-DLR and APGD-T)."""
    per_attack = {a: int(c) for a, c in zip(attacks, counts) if c is not None and a in ("apgd-dlr", "apgd-t")}
    if not per_attack:
        return Check("zero_gradients", SKIPPED, "no APGD attack with the DLR loss ran")
    details = {"per_attack": per_attack}
    total = sum(per_attack.values())
    if total:
        which = ", ".join(f"{a}: {c}" for a, c in per_attack.items() if c)
        return Check("zero_gradients", WARNING, f"{total} attacked point(s) had an exactly zero gradient ({which}): "
                     "gradient masking makes gradient attacks unreliable", details)
    return Check("zero_gradients", OK, "no point had an exactly zero gradient", details)


def check_square(attacks: Sequence[str], broken_by, robust_before: int | None, n: int) -> Check:
    """Points Square broke after the gradient attacks missed them (AutoAttack's 0.2-point rule)."""
    if "square" not in attacks or attacks.index("square") == 0:
        return Check("square", SKIPPED, "Square did not run after gradient attacks")
    s = attacks.index("square")
    count = int((broken_by == s).sum())
    share = count / n if n else 0.0
    details = {"broken_by_square": count, "share_of_points": round(share, 6), "robust_before_square": robust_before}
    text = f"Square broke {count} point(s) the gradient attacks missed ({100 * share:.2f}% of all points)"
    if share > SQUARE_TOLERANCE:
        return Check("square", WARNING, text + ": a sign of gradient masking", details)
    return Check("square", OK, text, details)


def check_fp32_rejected(precision: str, attacks: Sequence[str], rejected: Sequence[int]) -> Check:
    if precision != "bf16":
        return Check("fp32_rejected", SKIPPED, f"precision {precision}: every success is an fp32 success")
    per_attack = {a: int(r) for a, r in zip(attacks, rejected)}
    total = sum(per_attack.values())
    details = {"per_attack": per_attack}
    if total:
        return Check("fp32_rejected", WARNING, f"{total} bf16 success(es) were not confirmed by fp32 (not counted); "
                     "the bf16 attack may be weaker than an fp32 one", details)
    return Check("fp32_rejected", OK, "every bf16 success held in fp32", details)


def check_ties(ties: Sequence[dict[str, Any]]) -> Check:
    if ties:
        return Check("decision_ties", WARNING, f"{len(ties)} example(s) sit on a decision tie: their flags may "
                     "depend on the batch", {"count": len(ties)})
    return Check("decision_ties", OK, "no decision ties", {"count": 0})


# ---------------------------------------------------------------- the record's section


def preflight_checks(facts: Sequence[dict[str, Any]], *, version: str, attacks: Sequence[str], apgd_targets: int,
                     fab_targets: int) -> list[Check]:
    num_outputs = facts[0]["num_outputs"]
    return [check_randomized(facts, version), check_probabilities(facts), check_dynamic(facts),
            check_classes(num_outputs, attacks, apgd_targets, fab_targets)]


def section(checks: Sequence[Check]) -> dict[str, Any]:
    """The record's ``checks`` section: verdict, the rule it follows, one entry per check."""
    because = [c.name for c in checks if c.fired and c.name in UNRELIABLE_WHEN]
    return {"unreliable": bool(because), "because": because, "rule": RULE,
            "results": {c.name: c.to_dict() for c in checks}}


def warn(checks: Sequence[Check]) -> None:
    for c in checks:
        if c.fired:
            log.warning("reliability check %s: %s", c.name, c.reason)


def summary_lines(section_: dict[str, Any] | None) -> list[str]:
    """The short reliability block zoo-eval prints after the summary."""
    if not section_:
        return ["reliability: not checked (record written before checks were recorded)"]
    verdict = "UNRELIABLE (" + ", ".join(section_["because"]) + ")" if section_["unreliable"] else "no warning"
    lines = [f"reliability: {verdict}"]
    for name, result in section_["results"].items():
        lines.append(f"  {name:<15} {result['status']:<8} {result['reason']}")
    return lines
