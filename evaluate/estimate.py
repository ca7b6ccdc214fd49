"""Rough cost of a run before it starts: passes per example per stage, MACs, and a timed guess.

Pass counts come from the engine's attack settings (read from pyautoattack), MACs from forward hooks, and
seconds from timing a few forward/backward passes of the model on the run's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks.engine import AttackView
from . import devices
from .precision import autocast_dtype, precision_mode
from .prepare import Setup


def fmt_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Estimate:
    rows: list[dict[str, Any]]
    macs_per_image: int | None
    parameters: int
    seconds_forward: float      # per image
    seconds_backward: float     # per image (input gradient only)
    max_seconds: float
    typical_seconds: float | None


def _time_passes(model: nn.Module, shape: tuple[int, ...], device: torch.device, batch: int,
                 precision: str) -> tuple[float, float]:
    """Seconds per image for a forward pass and for the backward pass to the input (rough, 2 repeats)."""
    view = AttackView(model, autocast_dtype(precision))
    x = torch.rand(batch, *shape, device=device)

    def sync():
        devices.synchronize(device)

    with precision_mode(precision, device):
        with torch.no_grad():
            view(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(2):
            with torch.no_grad():
                view(x)
        sync()
        fwd = (time.perf_counter() - t0) / (2 * batch)
        t0 = time.perf_counter()
        for _ in range(2):
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(view(xg).sum(), xg)
        sync()
        both = (time.perf_counter() - t0) / (2 * batch)
    return fwd, max(both - fwd, 0.0)


def timing_batch(setup: Setup, n: int) -> int:
    """How many images the estimate times per pass: a few on a CPU (per-image cost hardly depends on it);
    on a GPU a batch as large as the attacks will run (B, within the probed device cap), since small
    batches leave a GPU mostly idle and would overestimate the run several times over."""
    if devices.is_gpu(setup.device):
        return max(1, min(c for c in (setup.opts.batch_size, setup.device_batch, n) if c is not None))
    return max(1, min(setup.opts.batch_size, 16, n))


def estimate(setup: Setup, n_points: int | None = None) -> Estimate:
    n = setup.n if n_points is None else n_points
    shape = tuple(setup.data.x.shape[1:])
    cost = count_macs(setup.model, shape, setup.device)
    o = setup.opts
    engine = setup.engine(AttackView(setup.model))
    t_f, t_b = _time_passes(setup.model, shape, setup.device, timing_batch(setup, n), o.precision)
    clean = setup.reported.get("clean_acc")
    robust = setup.reported.get("autoattack_acc")
    rows = [{"stage": "clean", "points": n, "forward": 1, "backward": 0,
             "typical_points": n if clean is not None else None}]
    for i, attack in enumerate(setup.attacks):
        f, b = engine.cost_per_point(attack, setup.num_classes)
        typical = None
        if clean is not None and robust is not None:
            typical = round(n * (clean if i == 0 else robust) / 100)
        rows.append({"stage": attack, "points": n, "forward": f, "backward": b, "typical_points": typical})
    max_seconds = sum(r["points"] * (r["forward"] * t_f + r["backward"] * t_b) for r in rows)
    typical_seconds = None
    if all(r["typical_points"] is not None for r in rows):
        typical_seconds = sum(r["typical_points"] * (r["forward"] * t_f + r["backward"] * t_b) for r in rows)
    return Estimate(rows=rows, macs_per_image=cost.macs_per_image, parameters=cost.parameters, seconds_forward=t_f,
                    seconds_backward=t_b, max_seconds=max_seconds, typical_seconds=typical_seconds)


@dataclass(frozen=True)
class Plan:
    setup: Setup
    estimate: Estimate
    text: str


def _weights_line(checkpoint: dict) -> str:
    if checkpoint.get("path") is None and checkpoint.get("sha256") is None and checkpoint.get("provenance") is None:
        return checkpoint["source"]   # planning: nothing downloaded
    sha = checkpoint.get("sha256") or checkpoint["weights_sha256"]
    return f"{checkpoint.get('path') or checkpoint['source']} (sha256 {sha[:16]}...)"


def plan_text(setup: Setup, est: Estimate) -> str:
    o = setup.opts
    d = setup.data
    idx = d.indices
    unread = ", not read: planning needs only the count" if d.source.get("planned") else ""
    lines = [
        f"model      {setup.label} ({est.parameters / 1e6:.2f}M parameters"
        + (f", {est.macs_per_image / 1e9:.3f} GMACs per image)" if est.macs_per_image else ")"),
        f"checkpoint {_weights_line(setup.checkpoint)}",
        f"data       {d.dataset} ({d.source.get('source')}{unread}), examples {idx[0]}..{idx[-1]} ({len(idx)})",
        f"threat     {o.threat} eps {o.eps} ({setup.eps:.6g}), version {o.version}, seed {o.seed}",
        f"engine     {o.engine} {setup.engine_version}, precision {o.precision}, device {setup.device}, "
        f"batch size {o.batch_size}, shard {setup.shard[0]}/{setup.shard[1]}"
        + (f", torch.compile {o.torch_compile} (eager timings below)" if o.torch_compile else ""),
        f"run folder {setup.run_dir or 'chosen at the start (the configuration hash needs the weights and data)'}",
        f"results    {setup.results_dir / setup.data.dataset / o.threat / setup.label}",
        "",
        f"{'stage':<10} {'points<=':>9} {'fwd/pt':>8} {'bwd/pt':>8} {'passes<=':>12} {'TMACs<=':>10}",
    ]
    total_passes = 0
    for r in est.rows:
        passes = r["points"] * (r["forward"] + r["backward"])
        total_passes += passes
        tmacs = f"{passes * est.macs_per_image / 1e12:10.1f}" if est.macs_per_image else f"{'?':>10}"
        lines.append(f"{r['stage']:<10} {r['points']:>9} {r['forward']:>8} {r['backward']:>8} {passes:>12.3g} {tmacs}")
    lines.append(f"{'total':<10} {'':>9} {'':>8} {'':>8} {total_passes:>12.3g}"
                 + (f" {total_passes * est.macs_per_image / 1e12:10.1f}" if est.macs_per_image else ""))
    lines += ["", "upper bound: every example attacked by every stage (a backward pass costs about one forward).",
              f"measured: {est.seconds_forward * 1e3:.3g} ms forward, {est.seconds_backward * 1e3:.3g} ms backward "
              f"per image on {setup.device}",
              f"estimated time: at most {fmt_seconds(est.max_seconds)}"
              + (f", about {fmt_seconds(est.typical_seconds)} at the reported accuracies"
                 if est.typical_seconds is not None else "")]
    return "\n".join(lines)


# ---------------------------------------------------------------- cost of one forward pass

@dataclass(frozen=True)
class ModelCost:
    macs_per_image: int | None
    parameters: int


def count_macs(model: nn.Module, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> ModelCost:
    """Multiply-accumulates of one forward pass on one image, summed over Conv and Linear layers.

    Counted with forward hooks on a single input; layers other than Conv/Linear are ignored (they are cheap
    next to them in CIFAR networks). None when the model has no such layers.
    """
    total = 0
    seen = False

    def hook(module, inputs, output):
        nonlocal total, seen
        seen = True
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups
            for k in module.kernel_size:
                per_out *= k
            total += int(output[0].numel()) * per_out
        else:
            total += int(output[0].numel()) * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(macs_per_image=total if seen else None, parameters=params)
