"""bf16 runs: bf16 drives the attack iterations, fp32 decides every flag.

Under bf16 autocast an attack takes its own initial robust mask from bf16 logits. An image that fp32
classifies correctly but bf16 does not is then "already adversarial" to the attack: it is returned unchanged,
never attacked, and the runner's fp32 check keeps it robust, overstating robust accuracy (seen on real nets:
CNN-A-Adv image 48, fp32 margin +0.0027). Likewise an attack that stops on an iterate bf16 calls adversarial
but fp32 does not has stopped attacking a point that is still robust.

After every bf16 batch, this module looks for the points bf16 calls misclassified on the returned image while
fp32 does not (for an unchanged image: bf16 misclassifies the clean image), and attacks exactly those again
with the same attack in fp32 (an fp32 engine of the same kind, seeded like every reference batch; the retried
points of one reference batch form one batch). Clean predictions, the initial robust flags of every stage and
every final flag come from fp32 (the runner); successes claimed in bf16 count only when an fp32 forward
confirms them. A claimed success that fp32 rejects is counted per stage in the record's
``extra["fp32_rejected_successes"]``; a point the bf16 attack returned unchanged is not a rejection (the
attack claimed nothing, it only skipped the point).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .precision import strict_fp32

log = logging.getLogger("zoo.evaluate")


def bf16_misses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rejected, retry) boolean masks over the batch, on the CPU, and the fp32 predictions on ``adv``.

    retry: bf16 calls the returned image misclassified, fp32 does not; rejected: those of them that the
    attack changed (a real claim of success that fp32 did not confirm).
    """
    with torch.no_grad():
        with strict_fp32(device):
            pred = model(adv).argmax(dim=1)
            fooled = pred != y
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            claimed = model(adv).argmax(dim=1) != y
    changed = (adv != x).flatten(1).any(dim=1)
    retry = (claimed & ~fooled).cpu()
    return retry & changed.cpu(), retry, pred


def fp32_second_chance(setup, state, fp32_engine, attack: str, stage: int,
                       batches: list[tuple[torch.Tensor, torch.Tensor]], advs: list[torch.Tensor]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """``advs`` with the points bf16 missed attacked again in fp32, and each batch's fp32 predictions on its
    returned images (None for a batch changed here: the runner predicts it again); counts rejections in
    ``state``."""
    subs, where, preds = [], [], []
    for i, ((x, y), adv) in enumerate(zip(batches, advs)):
        rejected, retry, pred = bf16_misses(setup.model, x, y, adv, setup.device)
        preds.append(pred)
        state.rejected[stage] += int(rejected.sum())
        if retry.any():
            idx = torch.nonzero(retry).flatten().to(x.device)
            subs.append((x[idx].contiguous(), y[idx]))
            where.append((i, idx))
    if not subs:
        return advs, preds
    fp32_engine.replay(setup.attacks[:stage])   # the attack objects in the state the bf16 engine's are in
    outs = fp32_engine.attack_batches(attack, subs)
    advs = list(advs)
    for (i, idx), out in zip(where, outs):
        patched = advs[i].clone()
        patched[idx] = out.to(device=patched.device, dtype=patched.dtype)
        advs[i] = patched
        preds[i] = None
    log.debug("%s: %d point(s) bf16 misclassified but fp32 did not, attacked again in fp32", attack,
              int(np.sum([len(idx) for _, idx in where])))
    return advs, preds
