"""Is bf16 faithful? fp32 and bf16 runs of zoo.evaluate on the real nets of ../shared and real CIFAR-10.

    python -m bench.bench_bf16_faithful [--n 400] [--nets cnn-a-adv,convsmall,resnet2b] [--engine native]
                                        [--attacks apgd-ce,apgd-t] [--threads 1] [--out bench/bf16_faithful.json]

For each net: the same engine, seed (0), batch size and data, once with --precision fp32 and once with
--precision bf16 (on a CPU this needs native bf16: AMX-BF16 / AVX512-BF16). Reports robust accuracy of
both, the difference in percentage points, and every example whose final flag differs, with its fp32
logit margin on the clean image and on the adversarial image the breaking run found.

Attacks: APGD-CE then APGD-T by default, a documented subset of `standard`: on these nets FAB-T and Square
break no further point (shared/models/MODELS.md, n=1000 runs), so the subset's final robust accuracy is
standard's, at a fraction of the time (2-core CPU, one thread). The architectures are rebuilt here from the
layer lists in shared/models/MODELS.md (written from those lists; the weights are read from ../shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.machine import load_average
from tests.support.helpers import SHARED, SHARED_DATA, Normalize, per_example, shared_cifar, write_npz

MODELS = SHARED / "models"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
ABCROWN_STD = (0.2471, 0.2435, 0.2616)


class Block(nn.Module):
    """conv3x3(stride s) - ReLU - conv3x3, plus a 1x1-conv (shape change) or identity shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride))

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class ResNetB(nn.Module):
    def __init__(self, stem: int, stages: list[tuple[int, int]], flat: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 2, 1)
        cin = stem
        for i, (cout, _) in enumerate(stages, start=1):
            setattr(self, f"layer{i}", nn.Sequential(Block(cin, cout, 2), Block(cout, cout, 1)))
            cin = cout
        self.n_stages = len(stages)
        self.linear1 = nn.Linear(flat, 100)
        self.linear2 = nn.Linear(100, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.linear2(torch.relu(self.linear1(x.flatten(1))))


def _small_cnn(padding: int, flat: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 4, 2, padding), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, padding), nn.ReLU(),
                         nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, 10))


def load_net(name: str) -> nn.Module:
    load = lambda f: torch.load(MODELS / f, map_location="cpu", weights_only=True)  # noqa: E731
    if name == "cnn-a-adv":
        net = _small_cnn(1, 2048)
        net.load_state_dict(load("cifar10_cnn_a_adv_at2px_sdpfo.pth"))
        norm = Normalize(tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)))
    elif name == "convsmall":
        net = _small_cnn(0, 1152)
        net.load_state_dict(load("cifar10_convsmall_pgd_eran.pth")["state_dict"][0])
        norm = Normalize(CIFAR_MEAN, (0.2023, 0.1994, 0.2010))
    elif name in ("resnet2b", "resnet4b"):
        net = ResNetB(8, [(16, 2)], 1024) if name == "resnet2b" else ResNetB(16, [(32, 2), (32, 2)], 512)
        net.load_state_dict(load(f"cifar10_{name}_at2px_abcrown.pth")["state_dict"])
        norm = Normalize(CIFAR_MEAN, ABCROWN_STD)
    else:
        raise SystemExit(f"unknown net {name!r}")
    return nn.Sequential(norm, net).eval()


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = model(x)
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return (true - other).numpy()


def run_net(name: str, n: int, attacks: list[str], engine: str, threads: int, batch_size: int, work: Path) -> dict:
    from zoo.evaluate import run

    x, y = shared_cifar(n)
    data = write_npz(work / f"{name}.npz", x, y)
    model = load_net(name)
    out = {"net": name, "n": n}
    flags = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        rec = run(model, data=str(data), eps="2/255", version="custom", attacks=attacks, engine=engine, seed=0,
                  batch_size=batch_size, device="cpu", precision=precision, threads=threads, progress=False,
                  model_label=name, results_dir=str(work / f"r-{name}-{precision}"),
                  run_dir=str(work / f"run-{name}-{precision}"))
        seconds = time.perf_counter() - t0
        pe = per_example(rec, work / f"r-{name}-{precision}")
        flags[precision] = pe
        out[precision] = {"clean": rec.clean.correct, "robust": rec.robust.correct, "seconds": round(seconds, 1),
                          "stages": [s.robust.correct for s in rec.stages],
                          "rejected": rec.extra["fp32_rejected_successes"],
                          "channels_last": rec.extra["channels_last"]}
    a, b = flags["fp32"], flags["bf16"]
    clean_margin = margins(model, x, y)
    diffs = []
    for pos in np.flatnonzero(a.robust != b.robust):
        broken = a if not a.robust[pos] else b
        k = int(np.flatnonzero(broken.adv_positions == pos)[0])
        adv = torch.from_numpy(broken.x_adv[k:k + 1])
        diffs.append({"index": int(pos), "fp32_robust": bool(a.robust[pos]), "bf16_robust": bool(b.robust[pos]),
                      "fp32_clean_margin": float(clean_margin[pos]),
                      "fp32_adv_margin": float(margins(model, adv, y[pos:pos + 1])[0])})
    out["disagreements"] = diffs
    out["clean_flags_equal"] = bool(np.array_equal(a.clean_correct, b.clean_correct))
    return out


def main(argv: list[str] | None = None) -> int:
    from zoo.evaluate import cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="images per net (first N of the shared 1000)")
    p.add_argument("--nets", default="cnn-a-adv,convsmall,resnet2b")
    p.add_argument("--attacks", default="apgd-ce,apgd-t")
    p.add_argument("--engine", default="native", choices=["native", "reference"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not SHARED_DATA.exists():
        raise SystemExit(f"needs the shared data and nets ({SHARED})")
    torch.set_num_threads(args.threads)
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpus.cpu_model(), "bf16_flag": cpus.native_bf16(),
           "threads": args.threads, "load_before": load_average(), "torch": torch.__version__,
           "python": platform.python_version(), "engine": args.engine, "attacks": args.attacks,
           "batch_size": args.batch_size}
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bf16-faithful-") as tmp:
        for name in args.nets.split(","):
            r = run_net(name, args.n, args.attacks.split(","), args.engine, args.threads, args.batch_size, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    env["load_after"] = load_average()
    env["wall_seconds"] = round(time.perf_counter() - t0, 1)
    total = sum(r["n"] for r in results)
    r32 = sum(r["fp32"]["robust"] for r in results)
    r16 = sum(r["bf16"]["robust"] for r in results)
    diff_pp = 100.0 * (r16 - r32) / total
    print(f"\n{env}\n")
    print("| net | n | clean | robust fp32 | robust bf16 | diff (pp) | fp32 s | bf16 s | rejected (bf16) | "
          "bf16 channels_last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['net']} | {r['n']} | {r['fp32']['clean']} | {r['fp32']['robust']} | {r['bf16']['robust']} | "
              f"{100.0 * (r['bf16']['robust'] - r['fp32']['robust']) / r['n']:+.2f} | {r['fp32']['seconds']} | "
              f"{r['bf16']['seconds']} | {r['bf16']['rejected']} | {r['bf16']['channels_last']} |")
    print(f"| all | {total} | | {r32} ({100.0 * r32 / total:.2f}%) | {r16} ({100.0 * r16 / total:.2f}%) | "
          f"{diff_pp:+.2f} | | | | |")
    for r in results:
        for d in r["disagreements"]:
            print(f"disagreement {r['net']} image {d['index']}: fp32 robust={d['fp32_robust']} bf16 robust="
                  f"{d['bf16_robust']}, fp32 clean margin {d['fp32_clean_margin']:+.4f}, fp32 margin of the "
                  f"adversarial image {d['fp32_adv_margin']:+.4f}")
    verdict = abs(diff_pp) <= 0.1 and all(r["clean_flags_equal"] for r in results)
    print(f"\nwithin 0.1 pp: {'yes' if verdict else 'NO'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results, "diff_pp": diff_pp}, indent=1))
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
