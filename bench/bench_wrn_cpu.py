"""WideResNet-28-10 on a CPU: per-stage throughput of pyautoattack vs the native engine (fp32, bf16), the
projected full 10k-image standard AutoAttack, and an end-to-end check of that projection.

Random weights (BatchNorm statistics from the images, labels = the model's own predictions), Linf. Rows:

- ``ref-robustbench``: pyautoattack as RobustBench calls it: batch 32, parameters requiring grad;
- ``ref-best``: pyautoattack with frozen parameters (as zoo-eval runs it) at the batch size of a quick sweep;
- ``native-fp32``, ``native-bf16`` (bf16 autocast, successes re-checked in fp32), ``native-bf16-cl``
  (bf16 with a channels_last model), and with ``--compile`` ``native-bf16-compiled`` (torch.compile).

Part 1 runs every stage on the same --n images with cut iteration counts (APGD 5 iterations, 1 target,
FAB-T 3 iterations, 1 target, Square 20 queries) and counts the images going through the model (forward and
backward); throughput = those images per second. Part 2 projects a full 10k-image run with SCORE's
accuracies: pass counts per point from pyautoattack's settings (the runner's estimate), divided by each
stage's throughput. Part 3 (with --e2e; it takes long) runs the native bf16 engine end to end with the FULL
settings (all four attacks, no cut iterations) on --e2e-n images at a tiny eps, so every stage does its full
work, and compares the wall time per stage with the same projection (throughput re-measured on those
images, as in part 1). Everything is timed with one torch thread unless --threads says otherwise.

    python -m bench.bench_wrn_cpu                 # parts 1-2, about 10 min on a 2-core Xeon, 1 thread
    python -m bench.bench_wrn_cpu --rows native-bf16 --e2e     # + part 3 (about 10 min more for 2 images)
    python -m bench.bench_wrn_cpu --n 16 --compile
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from bench.bench_gpu import build_wrn
from bench.bench_native_cpu import cpu_name
from tests.support.native import images
from zoo.evaluate.attacks.engine import AttackView
from zoo.evaluate.attacks.native.engine import NativeEngine

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
CLEAN_POINTS, LATER_POINTS = 8861, 6200     # SCORE WRN-28-10 Linf 8/255: 88.61% clean; ~62% reach APGD-T..Square


def cut(aa, full: bool) -> None:
    """Part 1's cut iteration counts (or pyautoattack's standard ones) on an AutoAttack object."""
    if full:
        return
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = 5
    aa.apgd_targeted.n_target_classes = 1
    aa.fab.n_iter, aa.fab.n_target_classes = 3, 1
    aa.square.n_queries = 20


def reference_stage(aa, attack: str, x, y, batch: int) -> None:
    obj = {"apgd-ce": aa.apgd, "apgd-t": aa.apgd_targeted, "fab-t": aa.fab, "square": aa.square}[attack]
    if attack == "apgd-ce":
        obj.loss = "ce"
    if attack == "fab-t":
        obj.targeted, obj.n_restarts = True, 1
    for xb, yb in zip(x.split(batch), y.split(batch)):
        obj.seed = 0
        obj.perturb(xb, yb)


class Row:
    def __init__(self, name: str, model, kind: str, batch: int, precision: str = "fp32", eps: float = 8 / 255,
                 full: bool = False):
        self.name, self.kind, self.batch = name, kind, batch
        self.view = AttackView(model)
        if kind == "native":
            self.engine = NativeEngine(self.view, norm="Linf", eps=eps, seed=0, device="cpu", precision=precision)
            self.aa = self.engine.autoattack
        else:
            import pyautoattack

            self.aa = pyautoattack.AutoAttack(self.view, norm="Linf", eps=eps, seed=0, version="standard",
                                              device="cpu")
        cut(self.aa, full)
        self.trainable = name == "ref-robustbench"

    def stage(self, attack: str, x, y) -> tuple[float, int, int]:
        """(wall seconds, forward images, backward images) of one stage on x."""
        self.view.take_counts()
        params = list(self.view.model.parameters())
        for p in params:
            p.requires_grad_(self.trainable)
        start = time.perf_counter()
        if self.kind == "native":
            self.engine.attack_batches(attack, [(xb, yb) for xb, yb in zip(x.split(self.batch), y.split(self.batch))])
        else:
            reference_stage(self.aa, attack, x, y, self.batch)
        seconds = time.perf_counter() - start
        for p in params:
            p.requires_grad_(False)
        f, b = self.view.take_counts()
        return seconds, f, b


def best_batch(model, x, log) -> int:
    """The reference's best CPU batch size: time forward+backward (input gradient, frozen) per image."""
    best, best_t = None, None
    for batch in (4, 8, 16):
        if batch > x.shape[0]:
            break
        per = float("inf")
        for _ in range(2):   # the faster of two (a shared machine is noisy)
            xb = x[:batch].clone().requires_grad_(True)
            t = time.perf_counter()
            torch.autograd.grad(model(xb).sum(), xb)
            per = min(per, (time.perf_counter() - t) / batch)
        log(f"#   batch {batch:3d}: {per * 1e3:.0f} ms per image forward+backward (fp32, frozen)")
        if best_t is None or per < best_t:
            best, best_t = batch, per
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="images per stage in part 1")
    p.add_argument("--e2e-n", type=int, default=2, help="images of the end-to-end run (part 3)")
    p.add_argument("--e2e-eps", type=float, default=1e-4, help="eps of part 3 (tiny: every stage does full work)")
    p.add_argument("--rows", default="ref-robustbench,ref-best,native-fp32,native-bf16,native-bf16-cl")
    p.add_argument("--compile", action="store_true", help="add a native-bf16-compiled row (slow to compile)")
    p.add_argument("--e2e", action="store_true", help="also run part 3 (long: full settings)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = print

    x, _ = images(max(args.n, args.e2e_n, 16))
    model = build_wrn(28, 10, x, torch.device("cpu"))
    for q in model.parameters():
        q.requires_grad_(False)
    with torch.no_grad():
        y = torch.cat([model(c).max(1)[1] for c in x.split(16)])
    log(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_name()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    log(f"# WRN-28-10 random weights, Linf 8/255, n {args.n}, labels = own predictions "
        f"({len(torch.unique(y))} classes); part 1 cut: APGD 5 it x 1 target, FAB-T 3 it x 1 target, Square 20 q")
    ref_b = best_batch(model, x, log)
    rows = []
    cl_model = None
    for name in args.rows.split(",") + (["native-bf16-compiled"] if args.compile else []):
        if name == "ref-robustbench":
            rows.append(Row(name, model, "reference", 32))
        elif name == "ref-best":
            rows.append(Row(name, model, "reference", ref_b))
        elif name == "native-fp32":
            rows.append(Row(name, model, "native", 32))
        elif name == "native-bf16":
            rows.append(Row(name, model, "native", 32, "bf16"))
        elif name == "native-bf16-cl":
            import copy

            cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            rows.append(Row(name, cl_model, "native", 32, "bf16"))
        elif name == "native-bf16-compiled":
            rows.append(Row(name, torch.compile(model, dynamic=True), "native", 32, "bf16"))
        else:
            sys.exit(f"error: unknown row {name!r}")

    xs, ys = x[:args.n], y[:args.n]
    through: dict[tuple[str, str], float] = {}
    log(f"\n## part 1: throughput (model images, forward + backward, per second), B {ref_b} for ref-best")
    log(f"{'row':22} " + " ".join(f"{s:>16}" for s in STAGES))
    for row in rows:
        cells = []
        for attack in STAGES:
            seconds, f, b = row.stage(attack, xs, ys)
            through[row.name, attack] = (f + b) / seconds
            cells.append(f"{through[row.name, attack]:7.1f} ({seconds:5.1f}s)")
        log(f"{row.name:22} " + " ".join(f"{c:>16}" for c in cells), flush=True)

    from zoo.evaluate.attacks.reference import ReferenceEngine

    ref_engine = ReferenceEngine(model, norm="Linf", eps=8 / 255, seed=0, device="cpu", version="standard",
                                 attacks=None)
    per_point = {a: ref_engine.cost_per_point(a, 10) for a in STAGES}
    points = {"apgd-ce": CLEAN_POINTS, "apgd-t": LATER_POINTS, "fab-t": LATER_POINTS, "square": LATER_POINTS}
    log("\n## part 2: projected full 10k-image standard run (SCORE accuracies; passes / throughput)")
    log(f"{'row':22} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'total h':>9} {'vs RB':>6} {'vs best':>7}")
    totals = {}
    for row in rows:
        hours = [points[a] * sum(per_point[a]) / through[row.name, a] / 3600 for a in STAGES]
        totals[row.name] = sum(hours)
    for row in rows:
        hours = [points[a] * sum(per_point[a]) / through[row.name, a] / 3600 for a in STAGES]
        rb, best = (totals.get(k, float("nan")) for k in ("ref-robustbench", "ref-best"))
        log(f"{row.name:22} " + " ".join(f"{h:9.1f}" for h in hours) + f" {totals[row.name]:9.1f} "
            f"{rb / totals[row.name]:6.2f} {best / totals[row.name]:7.2f}")

    if not args.e2e:
        return 0
    n = args.e2e_n
    xe, ye = x[:n], y[:n]
    log(f"\n## part 3: native-bf16 end to end, FULL settings, {n} images, eps {args.e2e_eps:g}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    probe = Row("native-bf16", model, "native", 32, "bf16", eps=args.e2e_eps)
    rate = {a: probe.stage(a, xe, ye) for a in STAGES}
    rate = {a: (f + b) / s for a, (s, f, b) in rate.items()}
    e2e = Row("native-bf16", model, "native", 32, "bf16", eps=args.e2e_eps, full=True)
    robust = torch.ones(n, dtype=torch.bool)
    log(f"{'stage':8} {'points':>6} {'fwd':>7} {'bwd':>7} {'predicted fwd+bwd':>18} {'projected s':>11} "
        f"{'from counted s':>14} {'measured s':>10} {'ratio':>6}")
    proj_total = meas_total = counted_total = 0.0
    for attack in STAGES:
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        f_pp, b_pp = e2e.engine.reference.cost_per_point(attack, 10)
        predicted = idx.numel() * (f_pp + b_pp)
        e2e.view.take_counts()
        start = time.perf_counter()
        adv = e2e.engine.attack_batches(attack, [(xe[idx], ye[idx])])[0]
        seconds = time.perf_counter() - start
        f, b = e2e.view.take_counts()
        with torch.no_grad():
            robust[idx[model(adv).max(1)[1] != ye[idx]]] = False
        projected, counted = predicted / rate[attack], (f + b) / rate[attack]
        proj_total += projected
        counted_total += counted
        meas_total += seconds
        log(f"{attack:8} {idx.numel():6d} {f:7d} {b:7d} {predicted:18d} {projected:11.1f} {counted:14.1f} "
            f"{seconds:10.1f} {seconds / projected:6.2f}", flush=True)
    log(f"{'total':8} {'':6} {'':7} {'':7} {'':18} {proj_total:11.1f} {counted_total:14.1f} {meas_total:10.1f} "
        f"{meas_total / proj_total:6.2f}")
    log(f"# end: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
