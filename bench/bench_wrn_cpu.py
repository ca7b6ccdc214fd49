"""WideResNet-28-10 on a CPU: per-stage throughput of pyautoattack vs the native engine (fp32, bf16), the
projected full 10k-image standard AutoAttack, and an end-to-end check of that projection.

Random weights (BatchNorm statistics from the images, labels = the model's own predictions), Linf. Rows:

- ``ref-robustbench``: pyautoattack as RobustBench calls it: batch 32, parameters requiring grad;
- ``ref-best``: pyautoattack with frozen parameters (as zoo-eval runs it) at the batch size of a quick sweep;
- ``ref-best-bf16-cl`` (not in the default rows): the same under bf16 autocast with a channels_last model, as
  ``zoo-eval --precision bf16`` runs the default (reference) engine on a CPU;
- ``native-fp32``, ``native-bf16`` (bf16 autocast, successes re-checked in fp32), ``native-bf16-cl``
  (bf16 with a channels_last model: zoo-eval's default for bf16 on a CPU), and with ``--compile``
  ``native-bf16-cl-compiled`` (the same through torch.compile).

Part 1 runs every stage on the same --n images at a tiny eps (--eps: no point is fooled, so every stage
does its full work on every point, as the projection assumes), twice: at a short and a long cut of the
iteration counts (APGD 5 / 20 iterations and 1 target, FAB-T 3 / 12 iterations and 1 target, Square 20 / 100
queries). It counts the images going through the model (forward and backward) and takes the throughput from
the difference, (passes long - passes short) / (seconds long - seconds short), which cancels each stage's
fixed costs (set-up, the last checks, and for bf16 the fp32 re-check of successes) that a full run spreads
over hundreds of iterations. Part 2 projects a full 10k-image run with SCORE's accuracies: pass counts per
point from pyautoattack's settings (the runner's estimate), divided by each stage's throughput. Part 3 (with
--e2e; it takes long) runs one native row (--e2e-row) end to end with the FULL settings (all four attacks, no
cut iterations) on --e2e-n images at the same eps, and compares the wall time per stage with the same
projection (throughput re-measured on those images, as in part 1). Everything is timed with one torch thread
unless --threads says otherwise. The compiled row (--compile) goes through zoo-eval's own
``--torch-compile default`` path (channels_last model, batches padded to buckets of at least 8 images, so
use --n 8 or more; fp32 checks eager); its compile and warm-up time is measured apart, before the timed runs.
Part 4 (--through-run N) is the user's path: ``zoo.evaluate.run`` with its defaults, APGD-CE at 8/255 on N
images, fp32 vs bf16, every fixed fp32 cost of the runner included.

    python -m bench.bench_wrn_cpu --compile       # parts 1-2, about 10 min on a 2-core Xeon, 1 thread
    python -m bench.bench_wrn_cpu --compile --e2e --e2e-n 1   # + part 3 (about 10 min more)
    python -m bench.bench_wrn_cpu --rows native-bf16 --n 2 --through-run 8   # part 4: zoo.evaluate.run, ~3 min
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import sys
import time
from pathlib import Path

import torch

from bench.bench_gpu import build_wrn
from bench.machine import cpu_model, load_average
from tests.support.native import images
from zoo.evaluate.attacks.compiled import compiled_for_attacks
from zoo.evaluate.attacks.engine import AttackView
from zoo.evaluate.attacks.native.engine import NativeEngine
from zoo.evaluate.precision import autocast_dtype

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
# part 1's cut iteration counts: APGD iterations, FAB-T iterations, Square queries (one target each)
CUTS = {"short": (5, 3, 20), "long": (20, 12, 100)}
CLEAN_POINTS, LATER_POINTS = 8861, 6200     # SCORE WRN-28-10 Linf 8/255: 88.61% clean; ~62% reach APGD-T..Square


def settings(aa) -> tuple[int, int, int, int, int, int]:
    return (aa.apgd.n_iter, aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes, aa.fab.n_iter,
            aa.fab.n_target_classes, aa.square.n_queries)


def set_settings(aa, values: tuple[int, int, int, int, int, int]) -> None:
    (aa.apgd.n_iter, aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes, aa.fab.n_iter,
     aa.fab.n_target_classes, aa.square.n_queries) = values


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
    def __init__(self, name: str, model, kind: str, batch: int, precision: str, eps: float, fp32_model=None):
        self.name, self.kind, self.batch = name, kind, batch
        # the native engine runs its own autocast; the reference gets it from the view, as zoo-eval gives it;
        # fp32 checks use the eager model (fp32_model) when the attacks' model is compiled, as in zoo-eval
        self.view = AttackView(model, autocast_dtype(precision) if kind == "reference" else None, fp32_model)
        if kind == "native":
            self.engine = NativeEngine(self.view, norm="Linf", eps=eps, seed=0, device="cpu", precision=precision)
            self.aa = self.engine.autoattack
        else:
            import pyautoattack

            self.aa = pyautoattack.AutoAttack(self.view, norm="Linf", eps=eps, seed=0, version="standard",
                                              device="cpu")
        self.trainable = name == "ref-robustbench"
        self.standard = settings(self.aa)

    def cut(self, level: str) -> None:
        """Part 1's cut iteration counts (``short`` / ``long``) or pyautoattack's standard ones (``full``)."""
        if level == "full":
            set_settings(self.aa, self.standard)
            return
        apgd, fab, square = CUTS[level]
        set_settings(self.aa, (apgd, apgd, 1, fab, 1, square))

    def stage(self, attack: str, x, y, level: str) -> tuple[float, int, int]:
        """(wall seconds, forward images, backward images) of one stage on x at cut ``level``."""
        self.cut(level)
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

    def throughput(self, attack: str, x, y) -> tuple[float, float]:
        """(passes per second from the short/long difference, fixed seconds of one stage run)."""
        s_short, f_short, b_short = self.stage(attack, x, y, "short")
        s_long, f_long, b_long = self.stage(attack, x, y, "long")
        if f_long + b_long <= f_short + b_short:
            sys.exit(f"error: {self.name} {attack}: the long cut made no more model passes than the short one "
                     "(were the points fooled early? use a smaller --eps)")
        rate = (f_long + b_long - f_short - b_short) / max(s_long - s_short, 1e-9)
        return rate, s_short - (f_short + b_short) / rate


def best_batch(model, x, log, n: int) -> int:
    """The reference's best CPU batch size up to ``n`` (part 1's images): time forward+backward (input
    gradient, frozen) per image."""
    best, best_t = None, None
    for batch in (4, 8, 16):
        if batch > max(n, 4):
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


def make_row(name: str, model, ref_b: int, x, y, log, eps: float) -> Row:
    if name == "ref-robustbench":
        return Row(name, model, "reference", 32, "fp32", eps)
    if name == "ref-best":
        return Row(name, model, "reference", ref_b, "fp32", eps)
    if name == "ref-best-bf16-cl":
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return Row(name, cl_model, "reference", ref_b, "bf16", eps)
    if name in ("native-fp32", "native-bf16"):
        return Row(name, model, "native", 32, name.split("-")[1], eps)
    if name in ("native-bf16-cl", "native-bf16-cl-compiled"):
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if name.endswith("compiled"):
            start = time.perf_counter()
            compiled = compiled_for_attacks(cl_model, "default", tuple(x.shape[1:]), torch.device("cpu"),
                                            autocast_dtype("bf16"))
            row = Row(name, compiled, "native", 32, "bf16", eps, fp32_model=cl_model)
            for attack in STAGES:   # every graph the timed runs need (batch buckets, FAB's per-class backward)
                row.stage(attack, x, y, "short")
            log(f"# {name}: compiled and warmed up in {time.perf_counter() - start:.0f} s (not in the timings)")
            return row
        return Row(name, cl_model, "native", 32, "bf16", eps)
    sys.exit(f"error: unknown row {name!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="images per stage in part 1")
    p.add_argument("--e2e-n", type=int, default=1, help="images of the end-to-end run (part 3)")
    p.add_argument("--eps", type=float, default=1e-4, help="Linf eps (tiny: every stage does its full work)")
    p.add_argument("--e2e-row", default="native-bf16-cl",
                   choices=["native-fp32", "native-bf16", "native-bf16-cl", "native-bf16-cl-compiled"])
    p.add_argument("--rows", default="ref-robustbench,ref-best,native-fp32,native-bf16,native-bf16-cl")
    p.add_argument("--compile", action="store_true", help="add a native-bf16-cl-compiled row (slow to compile)")
    p.add_argument("--e2e", action="store_true", help="also run part 3 (long: full settings)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--through-run", type=int, default=0, metavar="N",
                   help="also part 4: zoo.evaluate.run, APGD-CE at 8/255 on N images, fp32 vs --precision bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = functools.partial(print, flush=True)

    x, _ = images(max(args.n, args.e2e_n, 16))
    model = build_wrn(28, 10, x, torch.device("cpu"))
    for q in model.parameters():
        q.requires_grad_(False)
    with torch.no_grad():
        y = torch.cat([model(c).max(1)[1] for c in x.split(16)])
    log(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_model()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  load average {load_average()}")
    log(f"# WRN-28-10 random weights, Linf eps {args.eps:g}, n {args.n}, labels = own predictions "
        f"({len(torch.unique(y))} classes); part 1 cuts (APGD it, FAB-T it, Square q; 1 target): {CUTS}")
    ref_b = best_batch(model, x, log, args.n)
    names = args.rows.split(",") + (["native-bf16-cl-compiled"] if args.compile else [])
    rows = [make_row(name, model, ref_b, x[:args.n], y[:args.n], log, args.eps) for name in names]

    xs, ys = x[:args.n], y[:args.n]
    through: dict[tuple[str, str], float] = {}
    log(f"\n## part 1: throughput (model images, forward + backward, per second, from the short/long difference) "
        f"and each stage run's fixed seconds; B {ref_b} for ref-best")
    log(f"{'row':24} " + " ".join(f"{s:>18}" for s in STAGES))
    for row in rows:
        cells = []
        for attack in STAGES:
            rate, fixed = row.throughput(attack, xs, ys)
            through[row.name, attack] = rate
            cells.append(f"{rate:7.1f} (+{fixed:5.1f}s)")
        log(f"{row.name:24} " + " ".join(f"{c:>18}" for c in cells))

    from zoo.evaluate.attacks.reference import ReferenceEngine

    ref_engine = ReferenceEngine(model, norm="Linf", eps=8 / 255, seed=0, device="cpu", version="standard",
                                 attacks=None)
    per_point = {a: ref_engine.cost_per_point(a, 10) for a in STAGES}
    points = {"apgd-ce": CLEAN_POINTS, "apgd-t": LATER_POINTS, "fab-t": LATER_POINTS, "square": LATER_POINTS}
    log(f"\n## part 2: projected full 10k-image standard run (SCORE accuracies; passes / throughput); "
        f"load {load_average()}")
    log(f"{'row':24} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'total h':>9} {'vs RB':>6} {'vs best':>7}")
    hours = {row.name: [points[a] * sum(per_point[a]) / through[row.name, a] / 3600 for a in STAGES]
             for row in rows}
    totals = {name: sum(h) for name, h in hours.items()}
    rb, best = (totals.get(k, float("nan")) for k in ("ref-robustbench", "ref-best"))
    for row in rows:
        log(f"{row.name:24} " + " ".join(f"{h:9.1f}" for h in hours[row.name]) + f" {totals[row.name]:9.1f} "
            f"{rb / totals[row.name]:6.2f} {best / totals[row.name]:7.2f}")

    if args.e2e:
        end_to_end(args, model, ref_b, x, y, log)
    if args.through_run:
        through_run(args.through_run, model, args.threads, log)
    return 0


def end_to_end(args, model, ref_b: int, x, y, log) -> None:
    """Part 3: the row at FULL settings on a few images vs the projection from its part-1 style throughput."""
    n = args.e2e_n
    xe, ye = x[:n], y[:n]
    log(f"\n## part 3: {args.e2e_row} end to end, FULL settings, {n} images, eps {args.eps:g}; load {load_average()}")
    e2e = make_row(args.e2e_row, model, ref_b, xe, ye, log, args.eps)
    rate = {a: e2e.throughput(a, xe, ye)[0] for a in STAGES}   # then the same engine at the full settings
    robust = torch.ones(n, dtype=torch.bool)
    log(f"{'stage':8} {'points':>6} {'fwd':>7} {'bwd':>7} {'predicted fwd+bwd':>18} {'projected s':>11} "
        f"{'from counted s':>14} {'measured s':>10} {'ratio':>6}")
    proj_total = meas_total = counted_total = 0.0
    for attack in STAGES:
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        e2e.cut("full")
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
            f"{seconds:10.1f} {seconds / projected:6.2f}")
    log(f"{'total':8} {'':6} {'':7} {'':7} {'':18} {proj_total:11.1f} {counted_total:14.1f} {meas_total:10.1f} "
        f"{meas_total / proj_total:6.2f}")
    log(f"# end: load average {load_average()}")


def through_run(n: int, model, threads: int, log) -> None:
    """Part 4: the user's path, ``zoo.evaluate.run`` with its defaults (reference engine; bf16: channels_last,
    fp32 clean pass, fp32 re-check and second chance, fp32 final check), APGD-CE only at 8/255, fp32 vs bf16."""
    import tempfile

    import numpy as np

    from zoo.evaluate import run

    x, _ = images(n)
    with torch.no_grad():
        y = torch.cat([model(c).max(1)[1] for c in x.split(16)])
    log(f"\n## part 4: zoo.evaluate.run, default engine, APGD-CE, Linf 8/255, {n} images, batch {n}; "
        f"load {load_average()}")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="wrn-through-run-") as tmp:
        data = Path(tmp) / "d.npz"
        np.savez(data, x=x.numpy(), y=y.numpy())
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            record = run(copy.deepcopy(model), data=str(data), eps="8/255", version="custom", attacks=["apgd-ce"],
                         batch_size=n, device="cpu", precision=precision, threads=threads, progress=False,
                         model_label="wrn-28-10-random", results_dir=str(Path(tmp) / f"r-{precision}"),
                         run_dir=str(Path(tmp) / f"run-{precision}"))
            seconds[precision] = time.perf_counter() - start
            log(f"{precision}: {seconds[precision]:7.1f} s, clean {record.clean.correct}/{n}, robust "
                f"{record.robust.correct}, channels_last {record.extra['channels_last']}, fp32-rejected "
                f"{record.extra.get('fp32_rejected_successes')}")
    log(f"bf16 speed-up through zoo.evaluate.run: {seconds['fp32'] / seconds['bf16']:.2f}x; load {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
