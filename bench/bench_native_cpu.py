"""Time the native engine against pyautoattack on the same work, stage by stage, and check the flags agree.

Both sides follow run_standard_evaluation's schedule: a clean pass, then for each attack the still-robust
points cut into reference batches of --batch-size. The reference runs ``perturb`` batch by batch (seed reset
each time); the native engine gets all the batches of a stage at once (merged-batch mode, cut at
--max-device-batch). Each side keeps its own robust flags; the table says whether they agree after each
stage (any disagreement is listed with the point's margin).

    python -m bench.bench_native_cpu                                  # CNN-A-Adv, 96 images, CPU
    python -m bench.bench_native_cpu --device cuda --model wrn-28-10 --precision bf16 --n 1000 --batch-size 250

Models: cnn-a (CNN-A-Adv at 2/255, from ../shared/models) or wrn-28-10 (random weights, 10 classes; its
own predictions serve as labels so every point is attacked). Prints results; records nothing.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from bench.machine import cpu_model, load_average
from tests.support.native import CIFAR, CNN_A, cnn_a, images, margins  # model, data, margins
from zoo.evaluate.attacks.native.engine import NativeEngine, NativeOptions


def build(name: str, device: torch.device) -> torch.nn.Module:
    if name == "cnn-a":
        if not CNN_A.is_file():
            sys.exit(f"error: {CNN_A} is absent\n  fix: run from a checkout next to shared/, or use --model wrn-28-10")
        return cnn_a().to(device)
    from zoo.models import WideResNet

    torch.manual_seed(0)
    return WideResNet(num_classes=10, depth=28, width=10).eval().to(device)


def robust_batches(flags: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    idx = flags.nonzero().squeeze(1)
    return list(idx.split(batch_size))


def run_stage(kind: str, attack: str, model, engine, aa, x, y, flags, batch_size: int) -> float:
    """One stage on the points robust in ``flags`` (updated in place); returns wall seconds."""
    batches = robust_batches(flags, batch_size)
    if not batches:
        return 0.0
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    if kind == "native":
        advs = engine.attack_batches(attack, [(x[b], y[b]) for b in batches])
    else:
        advs = []
        for b in batches:
            obj = {"apgd-ce": aa.apgd, "apgd-t": aa.apgd_targeted, "square": aa.square, "fab-t": aa.fab}[attack]
            if attack == "apgd-ce":
                obj.loss = "ce"
            if attack == "fab-t":
                obj.targeted, obj.n_restarts = True, 1
            obj.seed = engine.seed
            with torch.no_grad():
                advs.append(obj.perturb(x[b], y[b]))
    sync()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for b, adv in zip(batches, advs):
            flags[b[model(adv).max(1)[1] != y[b]]] = False
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["cnn-a", "wrn-28-10"], default="cnn-a")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--n", type=int, default=96, help="images (the first n of the CIFAR-10 test set)")
    p.add_argument("--batch-size", type=int, default=32, help="the reference's batch size B")
    p.add_argument("--max-device-batch", type=int, default=None)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    p.add_argument("--attacks", default="apgd-ce,apgd-t,fab-t,square", help="any of apgd-ce,apgd-t,fab-t,square")
    p.add_argument("--repeat", type=int, default=1, help="time each stage this many times per side, alternating "
                   "which side goes first, and report the fastest (for a shared, noisy machine)")
    p.add_argument("--square-queries", type=int, default=5000, help="both sides get the same budget")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: 1)")
    p.add_argument("--no-reference", action="store_true", help="time the native engine only")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if not CIFAR.is_file():
        print(f"note: {CIFAR} is absent; using synthetic images")
    model = build(args.model, device)
    x, y = images(args.n)
    x, y = x.to(device), y.to(device)
    if args.model == "wrn-28-10":
        with torch.no_grad():
            y = torch.cat([model(c).max(1)[1] for c in x.split(args.batch_size)])

    engine = NativeEngine(model, norm=args.norm, eps=args.eps, seed=0, device=device, precision=args.precision,
                          options=NativeOptions(max_device_batch=args.max_device_batch))
    engine.autoattack.square.n_queries = args.square_queries
    aa = None
    if not args.no_reference:
        import pyautoattack

        aa = pyautoattack.AutoAttack(model, norm=args.norm, eps=args.eps, seed=0, version="standard", device=device)
        aa.square.n_queries = args.square_queries

    with torch.no_grad():
        clean = torch.cat([model(c).max(1)[1] for c in x.split(args.batch_size)]) == y
    flags = {"reference": clean.clone(), "native": clean.clone()}

    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_model()}  torch {torch.__version__}  "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}  "
          f"threads {torch.get_num_threads()}  load average {load_average()}")
    print(f"# model {args.model}  norm {args.norm}  eps {args.eps:.5f}  n {args.n}  B {args.batch_size}  "
          f"precision {args.precision}  square queries {args.square_queries}  clean {int(clean.sum())}/{args.n}")
    print(f"{'attack':8} {'reference s':>12} {'native s':>9} {'speed-up':>9} {'robust ref':>11} "
          f"{'robust nat':>11}  flags")
    totals = {"reference": 0.0, "native": 0.0}
    for attack in args.attacks.split(","):
        secs: dict[str, float] = {}
        after = {}
        for r in range(max(1, args.repeat)):
            for kind in ("reference", "native") if r % 2 == 0 else ("native", "reference"):
                if kind == "reference" and aa is None:
                    continue
                after[kind] = flags[kind].clone()
                took = run_stage(kind, attack, model, engine, aa, x, y, after[kind], args.batch_size)
                secs[kind] = min(secs.get(kind, took), took)
        for kind, value in after.items():
            flags[kind] = value
            totals[kind] += secs[kind]
        ref_s = secs.get("reference")
        diff = (flags["reference"] != flags["native"]).nonzero().squeeze(1).tolist() if aa else []
        verdict = "-" if aa is None else ("match" if not diff else f"DIFFER at {diff} (margins "
                                          f"{[round(v, 4) for v in margins(model, x[diff], y[diff]).tolist()]})")
        print(f"{attack:8} {ref_s if ref_s is not None else float('nan'):12.2f} {secs['native']:9.2f} "
              f"{(ref_s / secs['native']) if ref_s and secs['native'] else float('nan'):9.2f} "
              f"{int(flags['reference'].sum()) if aa else -1:11d} {int(flags['native'].sum()):11d}  {verdict}")
    if aa is not None:
        print(f"{'total':8} {totals['reference']:12.2f} {totals['native']:9.2f} "
              f"{totals['reference'] / max(totals['native'], 1e-9):9.2f}")
    print(f"# native counters: {engine.counters}")
    print(f"# end: load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
