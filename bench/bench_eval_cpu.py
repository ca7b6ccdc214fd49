"""zoo-eval against plain pyautoattack used the way RobustBench's ``benchmark()`` uses it, on a CPU.

One process, one model, the same real CIFAR-10 images and seed for every run:

- **baseline**: ``AutoAttack(model, norm='Linf', eps=EPS, version='standard', device='cpu', seed=0)`` and
  ``run_standard_evaluation(x, y, batch_size=32)``, as ``robustbench.eval.benchmark`` does (its default batch
  size is 32; the model's parameters stay trainable, as they do there). RobustBench passes no seed, which
  makes pyautoattack seed from the clock; seed 0 here so the runs can be compared example by example.
- **ours**: ``zoo.evaluate.run(model, ...)`` with the reference engine and with the native engine at the
  same batch size (the same AutoAttack batches, so the robust flags must equal the baseline's), and the
  native engine at a larger batch size if asked (``--large-batch-size``; different batches: different
  random draws, so the flags may differ a little; compare the accuracy only).

Timed: the whole call (for ours: data, model checks, cost estimate, attacks, fp32 re-check, record).
Records go to a temporary folder, never the repository's results/.

    python -m bench.bench_eval_cpu                       # CNN-A-Adv, eps 2/255, first 100 test images
    python -m bench.bench_eval_cpu --large-batch-size 250    # also ours at zoo-eval's default batch size
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zoo.evaluate
from bench.machine import cpu_model, load_average
from tests.support.helpers import per_example
from tests.support.native import CIFAR, CNN_A, cnn_a, margins, trained_cnn
from zoo.domain import parse_eps
from zoo.evaluate.data import load_file
from zoo.evaluate.options import DEFAULT_BATCH_SIZE


ROBUSTBENCH_BATCH_SIZE = 32   # robustbench.eval.benchmark(batch_size=32) in robustbench 1.1.1
BASELINE_STAGES = {"apgd": "apgd-ce", "apgd_targeted": "apgd-t", "fab": "fab-t", "square": "square"}
MODELS = {"cnn-a": "CNN-A-Adv (../shared/models, PGD-trained at 2/255)",
          "small-cnn": "small CNN trained for seconds on test images 400-999 (tests/support/native.py)"}


def build(name: str) -> torch.nn.Module:
    if name == "cnn-a":
        if not CNN_A.is_file():
            sys.exit(f"error: {CNN_A} is absent\n  fix: run from a checkout next to shared/, or use --model small-cnn")
        return cnn_a()
    return trained_cnn()


def _timed(method, seconds: dict[str, float], stage: str):
    """Wrap an attack object's ``perturb`` to add its wall time to ``seconds[stage]`` (results unchanged)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0

    return wrapper


def run_baseline(model, x, y, eps: float, batch_size: int) -> dict:
    import pyautoattack

    model.requires_grad_(True)   # as RobustBench leaves it: the attacks' backward passes also reach the weights
    t0 = time.perf_counter()
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=0)
    stage_seconds: dict[str, float] = {}
    for attr, stage in BASELINE_STAGES.items():
        obj = getattr(aa, attr)
        obj.perturb = _timed(obj.perturb, stage_seconds, stage)
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        clean = torch.cat([model(c).argmax(1) for c in x.split(batch_size)]) == y
    return {"label": "baseline", "engine": f"pyautoattack {pyautoattack.__version__}", "batch_size": batch_size,
            "wall": wall, "clean": clean.numpy(), "robust": (y_adv == y).numpy(), "x_adv": x_adv.numpy(),
            "stages": stage_seconds}


def run_ours(model, data_path: Path, n: int, eps_text: str, batch_size: int | None, engine: str, tmp: Path,
             label: str, torch_compile: str | None = None) -> dict:
    t0 = time.perf_counter()
    record = zoo.evaluate.run(model, data=data_path, n_ex=n, eps=eps_text, seed=0, batch_size=batch_size,
                              device="cpu", engine=engine, results_dir=tmp / "results", run_dir=tmp / f"run-{label}",
                              model_label=f"bench-{label}", progress=False, torch_compile=torch_compile)
    wall = time.perf_counter() - t0
    pe = per_example(record, tmp / "results")
    return {"label": label, "engine": record.engine, "batch_size": record.batch_size, "wall": wall,
            "clean": pe.clean_correct, "robust": pe.robust, "pe": pe,
            "stages": {s.attack: s.seconds for s in record.stages}}


def compare(model, base: dict, ours: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    """('match' or the disagreeing positions with both margins, max |x_adv difference|)."""
    x_adv = torch.from_numpy(ours["pe"].full_x_adv(x.numpy()))
    diff = float((x_adv - torch.from_numpy(base["x_adv"])).abs().max())
    bad = np.flatnonzero(ours["robust"] != base["robust"]).tolist()
    if not bad:
        return "match", diff
    ours_m = margins(model, x_adv[bad], y[bad]).tolist()
    base_m = margins(model, torch.from_numpy(base["x_adv"][bad]), y[bad]).tolist()
    detail = ", ".join(f"#{i} (margin ours {a:.2e}, baseline {b:.2e})" for i, a, b in zip(bad, ours_m, base_m))
    return f"{len(bad)} differ: {detail}", diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="cnn-a")
    p.add_argument("--n", type=int, default=100, help="the first n images of ../shared/data (at most 1000)")
    p.add_argument("--eps", default="2/255", help="Linf radius (CNN-A-Adv was trained at 2/255)")
    p.add_argument("--batch-size", type=int, default=ROBUSTBENCH_BATCH_SIZE,
                   help="the baseline's batch size, and ours at the same (default: RobustBench's 32)")
    p.add_argument("--large-batch-size", type=int, default=0,
                   help=f"also run ours (native engine) at this batch size, e.g. {DEFAULT_BATCH_SIZE} (zoo-eval's "
                        "default); 0 (default) skips it, keeping the default run near 3 minutes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every run (default 1)")
    p.add_argument("--torch-compile", metavar="MODE", default=None,
                   help="also run ours (native engine) with --torch-compile MODE; its wall time includes compiling")
    args = p.parse_args(argv)
    if not CIFAR.is_file():
        sys.exit(f"error: {CIFAR} is absent\n  fix: run from a checkout next to shared/")
    if not 0 < args.n <= 1000:
        sys.exit("error: --n must be between 1 and 1000")
    torch.set_num_threads(args.threads)

    eps = parse_eps(args.eps)
    data = load_file(CIFAR, args.n)   # exactly the tensors zoo.evaluate.run reads from the same file
    x, y = data.x, data.y
    model = build(args.model)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_model()}  {os.cpu_count()} CPUs  "
          f"load avg {load_average()}  torch {torch.__version__}  threads {args.threads}")
    print(f"# model {args.model}: {MODELS[args.model]}")
    print(f"# data {CIFAR.name} first {args.n}  Linf eps {args.eps}  AutoAttack standard  seed 0")
    print("# timed: whole calls. Flags and x_adv are compared with the baseline example by example.")
    sys.stdout.flush()

    runs = [run_baseline(copy.deepcopy(model).eval(), x, y, eps, args.batch_size)]
    with tempfile.TemporaryDirectory(prefix="bench-eval-cpu-") as tmp:
        plan = [("ours-ref", "reference", args.batch_size, None), ("ours-native", "native", args.batch_size, None)]
        if args.torch_compile:
            plan.append((f"ours-native-{args.torch_compile}", "native", args.batch_size, args.torch_compile))
        if args.large_batch_size:
            plan.append((f"ours-native-B{args.large_batch_size}", "native", args.large_batch_size, None))
        for label, engine, bs, compile_mode in plan:
            runs.append(run_ours(copy.deepcopy(model), CIFAR, args.n, args.eps, bs, engine, Path(tmp), label,
                                 compile_mode))

    base = runs[0]
    stages = list(BASELINE_STAGES.values())
    print(f"\n{'run':<22} {'engine':<22} {'B':>4} {'wall s':>8} {'speed-up':>9} {'clean %':>8} {'robust %':>9}  "
          f"{'x_adv max|d|':>12}  flags vs baseline")
    for r in runs:
        if r is base:
            verdict, diff = "-", 0.0
        else:
            verdict, diff = compare(model, base, r, x, y)
            if r["batch_size"] != base["batch_size"]:
                verdict += " (other batches: other random draws, differences allowed)"
        print(f"{r['label']:<22} {r['engine']:<22} {r['batch_size']:>4} {r['wall']:>8.1f} "
              f"{base['wall'] / r['wall']:>8.2f}x {100 * r['clean'].mean():>8.2f} {100 * r['robust'].mean():>9.2f}  "
              f"{diff:>12.3g}  {verdict}")
    print("\nseconds per stage (baseline: inside perturb; ours: the runner's stage time)")
    print(f"{'run':<22} " + " ".join(f"{s:>8}" for s in stages))
    for r in runs:
        print(f"{r['label']:<22} " + " ".join(f"{r['stages'].get(s, 0.0):>8.1f}" for s in stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
