"""Two --shard processes vs one process with one thread, on the same work.

    python -m bench.bench_shard_threads [--n 120] [--net cnn-a-adv] [--attacks apgd-ce,apgd-t]

Runs ``zoo-eval`` once as a single process with ``--threads 1`` over the whole set, then as K=2 processes
started together (``--shard 0/2`` and ``--shard 1/2``, default threads: available cores // 2 each), and
reports the wall-clock ratio (target >= 1.8x on 2 free cores) and whether the final flags are identical.
Both runs use the same split into two shards (a single process runs shard 0/2 then 1/2), so the
reference batches, and hence the results, are the same. Uses the real nets of ../shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import load_average
from tests.support.helpers import shared_cifar, write_npz


def _zoo_eval(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zoo.evaluate", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _flags(results: Path) -> dict[str, np.ndarray]:
    from zoo.evaluate.record import RunRecord
    (record_file,) = list(results.rglob("*.json"))
    record, pe = RunRecord.read_with_arrays(record_file)
    return {"robust": pe.robust, "broken_by": pe.broken_by, "x_adv": pe.x_adv, "threads": record.extra["threads"]}


def main(argv: list[str] | None = None) -> int:
    from zoo.evaluate import cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--net", default="cnn-a-adv")
    p.add_argument("--attacks", default="apgd-ce,apgd-t")
    p.add_argument("--batch-size", type=int, default=30)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shard-threads-") as tmp:
        work = Path(tmp)
        (work / "benchnet.py").write_text(
            "from bench.bench_bf16_faithful import load_net\n"
            f"def build():\n    return load_net({args.net!r})\n")
        write_npz(work / "d.npz", *shared_cifar(args.n))
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), repo])}
        env.pop("OMP_NUM_THREADS", None)   # the processes choose their threads themselves (--threads)

        def common(name):
            return ["--model-factory", "benchnet:build", "--data", str(work / "d.npz"), "--eps", "2/255",
                    "--attacks", args.attacks, "--batch-size", str(args.batch_size), "--device", "cpu",
                    "--results-dir", str(work / f"r-{name}"), "--run-dir", str(work / f"run-{name}"),
                    "--model-label", args.net, "--no-progress"]

        load_before = load_average()
        t0 = time.perf_counter()
        for i in range(2):   # one process at a time, one thread
            proc = _zoo_eval(common("one") + ["--shard", f"{i}/2", "--threads", "1"], env)
            out, err = proc.communicate()
            assert proc.returncode == 0, err
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        procs = [_zoo_eval(common("two") + ["--shard", f"{i}/2"], env) for i in range(2)]
        for proc in procs:
            out, err = proc.communicate()
            assert proc.returncode == 0, err
        two = time.perf_counter() - t0
        a, b = _flags(work / "r-one"), _flags(work / "r-two")
        same = all(np.array_equal(a[k], b[k]) for k in ("robust", "broken_by", "x_adv"))
    print(f"cpu: {cpus.cpu_model()}, cores available: {cpus.available_cores()}, "
          f"load before {load_before}, after {load_average()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"{args.net} n={args.n} {args.attacks} B={args.batch_size}")
    print(f"one process, 1 thread (shards 0/2 then 1/2): {one:.1f} s")
    print(f"two --shard processes together (threads per process: {b['threads']}): {two:.1f} s")
    print(f"speed-up {one / two:.2f}x (target >= 1.8x); results identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
