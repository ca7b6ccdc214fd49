"""Where the native engine's time goes on CNN-A-Adv: cProfile of one stage on the clean-correct points.

    python -m bench.profile_native_cpu fab-t --n 48
    python -m bench.profile_native_cpu square --n 96 --queries 2000

Prints the wall time and the functions with the most own time (one torch thread). Records nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from tests.support.native import cnn_a, images
from zoo.evaluate.attacks.native.engine import NativeEngine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("attack", choices=["apgd-ce", "apgd-t", "fab-t", "square"])
    p.add_argument("--n", type=int, default=48, help="first n CIFAR-10 test images (the clean-correct ones attacked)")
    p.add_argument("--queries", type=int, default=5000, help="Square's query budget")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = cnn_a()
    x, y = images(args.n)
    with torch.no_grad():
        keep = model(x).max(1)[1] == y
    x, y = x[keep], y[keep]
    engine = NativeEngine(model, norm="Linf", eps=2 / 255, seed=0, device="cpu")
    engine.autoattack.square.n_queries = args.queries
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    engine.attack_batches(args.attack, [(x, y)])
    profile.disable()
    print(f"# {args.attack}: {time.perf_counter() - start:.2f} s wall on {len(y)} points")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
