"""GPU throughput and faithfulness of the attack engines on a WideResNet, in one process, inside a time budget.

For WRN-28-10 (and WRN-70-16 with --wrn-70-16, if time is left) with random weights, this measures, per
AutoAttack stage (APGD-CE, APGD-T, FAB-T, Square):

- throughput in point-iterations per second (points x iterations, iterations = n_iter x targets for APGD-T /
  FAB-T, queries for Square) of: the reference (pyautoattack, parameters frozen as zoo-eval runs it, at the
  best batch size of a quick sweep) in fp32 (TF32 off) and tf32; the native engine in fp32, tf32 and bf16
  (bf16 attacks, successes re-checked in fp32); plus pyautoattack as RobustBench runs it (parameters
  trainable, NCHW model, PyTorch's default TF32 settings) on APGD-CE;
- the projected time of a full 10k-image standard AutoAttack for a model with SCORE's accuracies;
- faithfulness: per-example robust flags of native vs reference on the same points;
- peak GPU memory per measurement, and APGD-CE of the native engine on the 4 reference batches zoo-eval's
  runner merges into one device batch (does that fit, and is it faster per point).

Iteration counts are cut (see the header it prints) so everything fits in a few minutes; throughput is per
iteration actually run, so each run's fixed costs (start, final checks) are spread over fewer iterations than
in a full run and the projections err on the slow side. Stages are chained like AutoAttack: the points the
first row of a stage (the reference) leaves robust enter the next stage, for every row alike.

    python -m bench.bench_gpu                 # on a GPU; see bench/gpu_check.sh and bench/README.md
    python -m bench.bench_gpu --smoke         # tiny sizes, runs anywhere (CPU) in well under a minute
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import datetime
import importlib.util
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
SCORE_CLEAN_POINTS = 8861     # 88.61% of 10,000 enter APGD-CE (SCORE WRN-28-10, Linf 8/255)
SCORE_ROBUST_POINTS = 6104    # 61.04% robust at the end
LATER_STAGE_POINTS = 6200     # assumed to enter APGD-T, FAB-T and Square (6104 survive; a few fall to APGD-T)
APGD_CE_SURVIVAL = 0.70       # eps is calibrated so that about this share survives the measured APGD-CE


def import_zoo_evaluate() -> str:
    """``zoo.evaluate`` installed (pip) or, from a bare checkout, loaded from ./evaluate like the wheel maps it."""
    try:
        import zoo.evaluate  # noqa: F401
        return "installed package"
    except ModuleNotFoundError as exc:
        if exc.name != "zoo.evaluate":
            raise
    import zoo

    spec = importlib.util.spec_from_file_location("zoo.evaluate", ROOT / "evaluate" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "evaluate")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo.evaluate"] = module
    spec.loader.exec_module(module)
    zoo.evaluate = module
    return f"source tree {ROOT / 'evaluate'}"


# ---------------------------------------------------------------- output and time


class Log:
    """Prints and, when $OUT (or --log) is set, appends every line to a file at once (a killed run keeps it)."""

    def __init__(self, path: Path | None):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)   # $OUT need not exist off the device
        self.file = open(path, "a", buffering=1) if path is not None else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def fmt_time(seconds: float | None) -> str:
    from zoo.evaluate.estimate import fmt_seconds  # after main() has put the checkout on the import path

    return "-" if seconds is None else fmt_seconds(seconds)


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How much of each attack a measurement runs (the full standard settings are read from pyautoattack)."""

    points: int                   # images measured (cut to the reference's best batch size)
    sweep: tuple[int, ...]        # reference batch sizes tried on APGD-CE
    sweep_iter: int
    apgd_iter: int
    targets: int                  # target classes of APGD-T and FAB-T
    fab_iter: int
    square_queries: int
    calib_points: int
    calib_steps: int
    depth: int = 28
    width: int = 10


GPU_SIZES = Sizes(points=1024, sweep=(256, 512, 1024), sweep_iter=3, apgd_iter=10, targets=3, fab_iter=10,
                  square_queries=50, calib_points=256, calib_steps=6)
GPU_70_16 = replace(GPU_SIZES, points=256, sweep=(256,), calib_points=128, calib_steps=4, depth=70, width=16)
SMOKE_SIZES = Sizes(points=8, sweep=(4, 8), sweep_iter=1, apgd_iter=2, targets=2, fab_iter=2, square_queries=5,
                    calib_points=8, calib_steps=4, depth=10, width=1)
SMOKE_70_16 = replace(SMOKE_SIZES, points=4, sweep=(4,), depth=16, width=1)


def apply_sizes(aa, s: Sizes) -> None:
    """Cut a pyautoattack AutoAttack's attacks to the measured sizes (both engines read these objects)."""
    aa.apgd.n_iter = s.apgd_iter
    aa.apgd_targeted.n_iter = s.apgd_iter
    aa.apgd_targeted.n_target_classes = s.targets
    aa.fab.n_iter = s.fab_iter
    aa.fab.n_target_classes = s.targets
    aa.square.n_queries = s.square_queries


def iterations_per_point(aa, stage: str) -> int:
    """Model evaluations (with gradient for APGD and FAB) per point the attack object is set to make."""
    if stage == "apgd-ce":
        return aa.apgd.n_iter * aa.apgd.n_restarts
    if stage == "apgd-t":
        a = aa.apgd_targeted
        return a.n_iter * a.n_restarts * a.n_target_classes
    if stage == "fab-t":
        return aa.fab.n_iter * aa.fab.n_target_classes      # FAB-T runs one restart per target
    return aa.square.n_queries * aa.square.n_restarts


# ---------------------------------------------------------------- model and data


def build_wrn(depth: int, width: int, x: torch.Tensor, device: torch.device) -> nn.Module:
    """A WideResNet with random weights whose BatchNorm statistics come from ``x``.

    With the default statistics (mean 0, variance 1) a random WRN-28-10 gives every image the same class by
    margins near 1e-3; one pass over the images in train mode makes its predictions depend on the input,
    so eps can be tuned to a realistic share of robust points.
    """
    from zoo.models import WideResNet

    torch.manual_seed(0)
    with torch.device(device):
        model = WideResNet(num_classes=10, depth=depth, width=width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None        # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for chunk in x.split(256):
            model(chunk)
    return model.eval()


def load_images(n: int, device: torch.device) -> tuple[torch.Tensor, str]:
    from tests.support.native import CIFAR, images   # real CIFAR-10 when ../shared exists, else synthetic

    have = 1000 if CIFAR.is_file() else n
    x, _ = images(min(n, have))
    if len(x) < n:
        x = x.repeat(math.ceil(n / len(x)), 1, 1, 1)[:n]
    what = f"first {min(n, have)} CIFAR-10 test images" if CIFAR.is_file() else "synthetic images (../shared absent)"
    return x.contiguous().to(device), what + (f", repeated to {n}" if have < n else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    from zoo.evaluate.precision import strict_fp32

    with torch.no_grad(), strict_fp32(x.device):
        return torch.cat([model(c).float() for c in x.split(batch)])


# ---------------------------------------------------------------- engines


@dataclass(frozen=True)
class Variant:
    engine: str        # reference | native | robustbench (reference, trainable NCHW copy) | native-merged
    #                    | native-compiled (the native engine on the model through zoo-eval's --torch-compile)
    precision: str     # fp32 | tf32 | bf16 | default

    @property
    def name(self) -> str:
        return f"{self.engine}/{self.precision}"


@contextlib.contextmanager
def precision_switches(precision: str, device: torch.device):
    """TF32 as the variant wants it; 'default' = PyTorch's own (cuDNN TF32 on, matmul TF32 off)."""
    from zoo.evaluate.precision import precision_mode

    if precision != "default":
        with precision_mode(precision, device):
            yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_engine(variant: Variant, model: nn.Module, eps: float, device: torch.device, sizes: Sizes,
                compile_mode: str | None = None):
    from zoo.evaluate.attacks.compiled import compiled_for_attacks
    from zoo.evaluate.attacks.reference import ReferenceEngine
    from zoo.evaluate.attacks.native.engine import NativeEngine

    if variant.engine == "native-compiled":   # compiled here (outside the timed stage), as the runner does
        from zoo.evaluate.attacks.engine import AttackView

        autocast = torch.bfloat16 if variant.precision == "bf16" else None
        compiled = compiled_for_attacks(model, compile_mode, (3, 32, 32), device, autocast)
        # the runner's view: attacks call the compiled model, successes are re-checked by the eager fp32 one
        model = AttackView(compiled, autocast, fp32_model=model)
    # tf32 is a global switch, not an engine precision (as in zoo-eval)
    if variant.engine in ("native", "native-compiled"):
        engine = NativeEngine(model, norm="Linf", eps=eps, seed=0, device=device,
                              precision="bf16" if variant.precision == "bf16" else "fp32")
    else:
        engine = ReferenceEngine(model, norm="Linf", eps=eps, version="standard", attacks=None, seed=0, device=device)
    apply_sizes(engine.autoattack, sizes)
    return engine


def run_stage(engine, stage: str, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """The reference's batches of ``batch`` points; the native engine gets them all at once (merged mode)."""
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    if hasattr(engine, "attack_batches"):
        return torch.cat(engine.attack_batches(stage, batches))
    return torch.cat([engine.attack_batch(stage, xb, yb) for xb, yb in batches])


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    model: str
    stage: str
    variant: Variant
    points: int
    iters: int                 # per point
    seconds: float | None = None
    fooled: torch.Tensor | None = None     # per point, fp32 check
    adv: torch.Tensor | None = None
    peak_gib: float | None = None          # GPU memory allocated at the peak of the measurement
    note: str = ""

    @property
    def throughput(self) -> float | None:
        if not self.seconds:
            return None
        return self.points * self.iters / self.seconds


@dataclass
class ModelRun:
    label: str
    sizes: Sizes
    variants: list[Variant]
    eps: float = float("nan")
    batch: int = 0
    full_iters: dict[str, int] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    agreement: dict[tuple[str, Variant], str] = field(default_factory=dict)   # (stage, variant) -> verdict
    cut: object = None     # a pyautoattack AutoAttack with the measured (cut) settings
    compile_mode: str | None = None   # torch.compile mode of the native-compiled rows

    def row(self, stage: str, variant: Variant) -> Row | None:
        for r in self.rows:
            if r.stage == stage and r.variant == variant and r.seconds is not None:
                return r
        return None


def warm_up(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device) -> None:
    """One forward+backward at the measured shape (kernel choice, workspace) outside the timings."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad(), precision_switches(precision, device):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            out = model(xg)
        torch.autograd.grad(out.float().sum(), xg)
    sync(device)


def calibrate_eps(model, x, y, sizes: Sizes, device: torch.device, log: Log) -> tuple[float, float]:
    """Bisect eps (log scale) until about APGD_CE_SURVIVAL of the points survive the measured APGD-CE (tf32).

    Returns the eps whose survival came closest to the target, and that survival.
    """
    lo, hi = math.log(0.05 / 255), math.log(32 / 255)
    xs, ys = x[:sizes.calib_points], y[:sizes.calib_points]
    best = (float("inf"), float("nan"), float("nan"))      # (distance to target, eps, survival)
    for step in range(sizes.calib_steps):
        eps = math.exp((lo + hi) / 2)
        engine = make_engine(Variant("native", "tf32"), model, eps, device, sizes)
        with torch.no_grad(), precision_switches("tf32", device):
            adv = run_stage(engine, "apgd-ce", xs, ys, len(xs))
        survival = float((predict(model, adv).argmax(1) == ys).float().mean())
        log(f"  calibration {step + 1}: eps {eps * 255:.4f}/255 -> {100 * survival:.1f}% of {len(xs)} points "
            f"survive APGD-CE ({sizes.apgd_iter} iterations)")
        best = min(best, (abs(survival - APGD_CE_SURVIVAL), eps, survival))
        if best[0] < 0.05:
            break
        if survival > APGD_CE_SURVIVAL:
            lo = math.log(eps)
        else:
            hi = math.log(eps)
    return best[1], best[2]


def sweep_batch(model, x, y, eps: float, sizes: Sizes, device: torch.device, budget: Budget, log: Log) -> int:
    """The reference's fastest batch size on APGD-CE (tf32, a few iterations per size)."""
    if len(sizes.sweep) == 1:
        return sizes.sweep[0]
    quick = replace(sizes, apgd_iter=sizes.sweep_iter)
    engine = make_engine(Variant("reference", "tf32"), model, eps, device, quick)
    best, best_rate = sizes.sweep[0], 0.0
    for b in sizes.sweep:
        if budget.left() < 30:
            log(f"  sweep stopped: {budget.left():.0f} s left")
            break
        xs = x[:b] if len(x) >= b else x.repeat(math.ceil(b / len(x)), 1, 1, 1)[:b].contiguous()
        ys = y[:b] if len(y) >= b else y.repeat(math.ceil(b / len(y)))[:b]
        try:
            with torch.no_grad(), precision_switches("tf32", device):
                warm_up(model, xs, "tf32", device)
                sync(device)
                t0 = time.perf_counter()
                engine.attack_batch("apgd-ce", xs, ys)
                sync(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log(f"  reference batch {b}: out of memory")
            break
        rate = b * quick.apgd_iter / (time.perf_counter() - t0)
        log(f"  reference batch {b}: {rate:,.0f} point-iterations/s (APGD-CE, tf32, {quick.apgd_iter} iterations)")
        if rate > best_rate:
            best, best_rate = b, rate
    return best


STAGE_COST = {"apgd-ce": 1.0, "apgd-t": 1.0, "fab-t": 2.0, "square": 0.6}   # per iteration, vs APGD (rough)


def expected_seconds(run: ModelRun, stage: str, variant: Variant, points: int) -> float | None:
    """A rough guess from the same variant's APGD-CE throughput, to skip what would overrun the budget."""
    first = run.row("apgd-ce", variant) or run.row("apgd-ce", Variant("reference", variant.precision))
    if first is None or first.throughput is None:
        return None
    iters = iterations_per_point(run.cut, stage)       # the same cut settings for every engine
    return STAGE_COST[stage] * points * iters / first.throughput


def measure(run: ModelRun, model: nn.Module, rb_model: nn.Module | None, stage: str, variant: Variant,
            x: torch.Tensor, y: torch.Tensor, device: torch.device, engines: dict, log: Log,
            batch: int | None = None) -> Row:
    target = rb_model if variant.engine == "robustbench" else model
    if variant not in engines:
        kind = {"robustbench": Variant("reference", variant.precision),
                "native-merged": Variant("native", variant.precision)}.get(variant.engine, variant)
        started = time.perf_counter()
        engines[variant] = make_engine(kind, target, run.eps, device, run.sizes, run.compile_mode)
        if variant.engine == "native-compiled":
            took = time.perf_counter() - started
            log(f"  torch.compile (mode {run.compile_mode}) took {took:.0f} s (not in the rows)")
    engine = engines[variant]
    run.cut = run.cut or engine.autoattack
    aa = engine.autoattack
    row = Row(run.label, stage, variant, points=len(x), iters=iterations_per_point(aa, stage))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.no_grad(), precision_switches(variant.precision, device):
            sync(device)
            t0 = time.perf_counter()
            adv = run_stage(engine, stage, x, y, batch or run.batch)
            sync(device)
            row.seconds = time.perf_counter() - t0
    except Exception as exc:   # one failed row must not cost the table: mark it and go on
        from zoo.evaluate import devices

        if devices.is_out_of_memory(exc):
            devices.empty_cache()
            row.note = f"out of GPU memory ({len(x)} points)"
        else:
            row.note = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log(f"  {variant.name} {stage}: {row.note}")
            log("".join(traceback.format_exception(exc)[-3:]).rstrip())
        return row
    finally:
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
    logits = predict(model, adv)
    row.fooled = logits.argmax(1) != y
    row.adv = adv
    dist = (adv - x).abs().flatten(1).amax(1)
    bad = int(((dist > run.eps + 1e-6) | (adv < 0).flatten(1).any(1) | (adv > 1).flatten(1).any(1)).sum())
    if bad:
        row.note = f"{bad} adversarial images outside the threat model"
    return row


def log_row(log: Log, row: Row) -> None:
    if row.seconds is None:
        log(f"  {row.stage:8} {row.variant.name:21} {row.note}")
        return
    memory = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
    log(f"  {row.stage:8} {row.variant.name:21} {row.points:5d} pts x {row.iters:4d} it in {row.seconds:7.2f} s = "
        f"{row.throughput:>10,.0f} pt-it/s, fooled {int(row.fooled.sum()):4d}{memory} {row.note}")


def merged_probe(run: ModelRun, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 budget: Budget, log: Log) -> None:
    """APGD-CE of the native engine on MERGED_BATCHES reference batches at once, as zoo-eval's runner hands
    them over (chunk_batches), with the runner's device-batch cap lifted: would it fit, and is it faster per point?"""
    from zoo.evaluate.options import DEFAULT_CHUNK_BATCHES

    n = DEFAULT_CHUNK_BATCHES * run.batch
    xs = x.repeat(math.ceil(n / len(x)), 1, 1, 1)[:n].contiguous()
    ys = y.repeat(math.ceil(n / len(y)))[:n]
    for precision in ("bf16", "tf32"):
        variant = Variant("native-merged", precision)
        base = run.row("apgd-ce", Variant("native", precision))
        if base is None or base.throughput is None:
            continue
        guess = n * base.iters / base.throughput
        if budget.left() - 10 < guess:
            log(f"  apgd-ce  {variant.name}: skipped, {budget.left():.0f} s left (expected {guess:.0f} s)")
            continue
        row = measure(run, model, None, "apgd-ce", variant, xs, ys, device, {}, log, batch=run.batch)
        row.note = (row.note + f" {DEFAULT_CHUNK_BATCHES} x {run.batch} merged").strip()
        run.rows.append(row)
        if variant not in run.variants:
            run.variants.append(variant)
        log_row(log, row)


def compare_rows(model, mine: Row, ref: Row, y: torch.Tensor, exact: bool) -> tuple[str, str]:
    """(short verdict, details) for the flags of ``mine`` against ``ref`` on the same points.

    exact: every flag must agree (fp32 and tf32 rows); otherwise (bf16) the robust count must stay within
    0.1 percentage point of the points measured. Disagreements are listed with both fp32 margins.
    """
    diff = (mine.fooled != ref.fooled).nonzero().squeeze(1)
    n = mine.points
    if diff.numel() == 0:
        return "identical", f"identical on {n} points"
    delta = int((~mine.fooled).sum() - (~ref.fooled).sum())
    pp = 100.0 * delta / n
    short = f"{diff.numel()}/{n} differ, robust {delta:+d} ({pp:+.2f} pp)"
    if exact:
        short = "DIFFER: " + short
    else:
        short += " ok" if abs(pp) <= 0.1 else " OVER 0.1 pp"
    idx = diff[:8]
    from zoo.evaluate.attacks.native.square import margins

    m_mine = margins(predict(model, mine.adv[idx]), y[idx]).tolist()
    m_ref = margins(predict(model, ref.adv[idx]), y[idx]).tolist()
    listed = ", ".join(f"#{int(i)} ({a:+.1e}/{b:+.1e})" for i, a, b in zip(idx, m_mine, m_ref))
    return short, f"{short}; fp32 margins mine/ref: {listed}{' ...' if diff.numel() > 8 else ''}"


def reference_of(variant: Variant, available: set[Variant]) -> Variant | None:
    """What a row's flags are checked against: the reference at the same TF32 setting (bf16: fp32)."""
    if variant.engine not in ("native", "native-compiled"):
        return None
    want = [Variant("reference", "tf32")] if variant.precision == "tf32" else \
        [Variant("reference", "fp32"), Variant("reference", "tf32")]
    return next((w for w in want if w in available), None)


def bench_model(run: ModelRun, device: torch.device, budget: Budget, log: Log, rb_row: bool,
                channels_last: bool, eps_override: float | None) -> None:
    s = run.sizes
    log(f"\n== {run.label}: building (random weights), {budget.left():.0f} s of the budget left")
    x, data_note = load_images(max(s.points, max(s.sweep)), device)
    model = build_wrn(s.depth, s.width, x, device)
    model.requires_grad_(False)          # as zoo-eval runs every engine: input gradients only
    rb_model = None
    if rb_row:
        rb_model = copy.deepcopy(model).requires_grad_(True)    # RobustBench: trainable, NCHW
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    y = predict(model, x).argmax(1)     # its own clean predictions: every point starts correct
    params = sum(p.numel() for p in model.parameters())
    log(f"  {params / 1e6:.1f}M parameters, {data_note}, labels = its fp32 predictions "
        f"({len(torch.unique(y))} classes used), channels_last {channels_last and device.type == 'cuda'}")
    import pyautoattack

    full = pyautoattack.AutoAttack(model, norm="Linf", eps=1.0, seed=0, version="standard", device=device)
    run.full_iters = {st: iterations_per_point(full, st) for st in STAGES}
    if eps_override is not None:
        run.eps = eps_override
        log(f"  eps {run.eps * 255:.4f}/255 (given)")
    else:
        with torch.no_grad():
            warm_up(model, x[:s.calib_points], "tf32", device)
        run.eps, survival = calibrate_eps(model, x, y, s, device, log)
        log(f"  eps {run.eps * 255:.4f}/255: {100 * survival:.1f}% survive the measured APGD-CE "
            f"(target {100 * APGD_CE_SURVIVAL:.0f}%)")
    run.batch = sweep_batch(model, x, y, run.eps, s, device, budget, log)
    n = min(s.points, run.batch) if len(s.sweep) > 1 else s.points
    x, y = x[:n].contiguous(), y[:n]
    log(f"  reference batch size {run.batch}; {n} points measured")
    for precision in sorted({v.precision for v in run.variants if v.engine != "robustbench"}):
        warm_up(model, x, precision, device)
    if rb_model is not None:
        warm_up(rb_model, x, "default", device)
    engines: dict = {}
    entering = torch.ones(n, dtype=torch.bool, device=device)
    for stage in STAGES:
        idx = entering.nonzero().squeeze(1)
        if idx.numel() == 0:
            log(f"  {stage}: no point left robust; stages from here are not measured")
            break
        xs, ys = x[idx].contiguous(), y[idx]
        for variant in run.variants:
            if variant.engine == "robustbench" and stage != "apgd-ce":
                continue
            guess = expected_seconds(run, stage, variant, len(xs))
            if budget.left() < 15 or (guess is not None and guess > budget.left() - 10):
                log(f"  {stage} {variant.name}: skipped, {budget.left():.0f} s of the budget left"
                    + (f" (expected to take {guess:.0f} s)" if guess is not None else ""))
                continue
            try:
                row = measure(run, model, rb_model, stage, variant, xs, ys, device, engines, log)
            except Exception:    # one failure must not cost the rest of the device call
                log(f"  {stage} {variant.name}: FAILED\n" + traceback.format_exc())
                continue
            run.rows.append(row)
            log_row(log, row)
        done = {r.variant for r in run.rows if r.stage == stage and r.seconds is not None}
        for variant in run.variants:
            mine = run.row(stage, variant)
            ref_variant = reference_of(variant, done)
            if mine is None or ref_variant is None:
                continue
            short, text = compare_rows(model, mine, run.row(stage, ref_variant), ys, exact=variant.precision != "bf16")
            run.agreement[(stage, variant)] = f"{short} vs {ref_variant.name}"
            log(f"  flags {stage:8} {variant.name:12} vs {ref_variant.name:15} {text}")
        chain = next((run.row(stage, v) for v in run.variants if v.engine != "robustbench" and run.row(stage, v)), None)
        if chain is None:
            log(f"  {stage}: nothing measured; later stages are not measured")
            break
        survivors = ~chain.fooled
        entering = torch.zeros_like(entering)
        entering[idx[survivors]] = True
    merged_probe(run, model, x, y, device, budget, log)
    del engines, model, rb_model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- report


def projected(run: ModelRun, row: Row) -> float | None:
    """Seconds this stage would take on a 10k-image run of a model with SCORE's accuracies."""
    if row.throughput is None:
        return None
    points = SCORE_CLEAN_POINTS if row.stage == "apgd-ce" else LATER_STAGE_POINTS
    return points * run.full_iters[row.stage] / row.throughput


def report(runs: list[ModelRun], log: Log) -> None:
    log("\n" + "=" * 100)
    log("SUMMARY (throughput = points x iterations / s at the cut sizes above; projected = a 10k-image standard "
        f"AutoAttack with SCORE's accuracies: {SCORE_CLEAN_POINTS} points enter APGD-CE, {LATER_STAGE_POINTS} assumed "
        f"to enter APGD-T, FAB-T and Square ({SCORE_ROBUST_POINTS} survive), full iteration counts, clean pass "
        "left out). vs ref: same stage, reference fp32 / reference tf32.")
    for run in runs:
        if not run.rows:
            continue
        log(f"\n{run.label}  eps {run.eps * 255:.3f}/255  reference batch {run.batch}  full iterations per point "
            + ", ".join(f"{k} {v}" for k, v in run.full_iters.items()))
        log(f"{'stage':8} {'engine/precision':21} {'pt-it/s':>10} {'vs fp32':>8} {'vs tf32':>8} "
            f"{'projected':>10}  flags")
        totals: dict[Variant, list[float | None]] = {v: [] for v in run.variants
                                                     if v.engine in ("reference", "native", "native-compiled")}
        for stage in STAGES:
            ref32, ref_tf = run.row(stage, Variant("reference", "fp32")), run.row(stage, Variant("reference", "tf32"))
            for variant in run.variants:
                row = run.row(stage, variant)
                if row is None:
                    if variant in totals:
                        totals[variant].append(None)
                    continue
                ratios = [f"{row.throughput / r.throughput:7.2f}x" if r is not None else f"{'-':>8}"
                          for r in (ref32, ref_tf)]
                proj = projected(run, row)
                if variant in totals:
                    totals[variant].append(proj)
                log(f"{stage:8} {variant.name:21} {row.throughput:>10,.0f} {ratios[0]} {ratios[1]} "
                    f"{fmt_time(proj):>10}  {run.agreement.get((stage, variant), '-')}")
        log(f"{'TOTAL':8} {'engine/precision':21} {'projected 10k run':>29}   speed-up vs reference fp32 / tf32")
        base = {p: totals.get(Variant("reference", p)) for p in ("fp32", "tf32")}
        for variant, parts in totals.items():
            total = sum(parts) if parts and all(p is not None for p in parts) and len(parts) == len(STAGES) else None
            ups = []
            for p in ("fp32", "tf32"):
                b = base[p]
                bt = sum(b) if b and all(v is not None for v in b) and len(b) == len(STAGES) else None
                ups.append(f"{bt / total:.2f}x" if bt and total else "-")
            log(f"{'total':8} {variant.name:21} {fmt_time(total) if total else 'incomplete':>29}   "
                f"{ups[0]} / {ups[1]}")


def write_json(runs: list[ModelRun], path: Path, header: dict) -> None:
    """Every measured row, machine-readable, for bench/RESULTS.md."""
    import json

    out = {**header, "models": []}
    for run in runs:
        out["models"].append({
            "model": run.label, "eps": run.eps, "reference_batch": run.batch, "full_iterations": run.full_iters,
            "rows": [{"stage": r.stage, "engine": r.variant.engine, "precision": r.variant.precision,
                      "points": r.points, "iterations_per_point": r.iters, "seconds": r.seconds,
                      "throughput": r.throughput, "projected_seconds": projected(run, r), "peak_gib": r.peak_gib,
                      "fooled": None if r.fooled is None else int(r.fooled.sum()), "note": r.note,
                      "flags": run.agreement.get((r.stage, r.variant))} for r in run.rows]})
    path.write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and models; runs on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds "
                                                               "(default 420; smoke 120)")
    p.add_argument("--budget-cap-s", type=float, default=None,
                   help="at most this many seconds whatever the budget (gpu_check.sh passes the time it has left)")
    p.add_argument("--wrn-70-16", action="store_true", help="then WRN-70-16 (tf32 and bf16 rows), if time is left")
    p.add_argument("--eps", type=float, default=None, help="skip the eps calibration (value in [0, 1] units)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the model NCHW (zoo-eval uses "
                                                                    "channels_last on GPUs)")
    p.add_argument("--torch-compile", metavar="MODE", default=None,
                   help="also measure the native engine in bf16 on the model compiled as zoo-eval --torch-compile "
                        "MODE does (compile time is logged, not counted in the rows)")
    p.add_argument("--log", default=None, help="also write the output here (default: $OUT/gpu_check.log if $OUT)")
    args = p.parse_args(argv)

    seconds = args.budget_s if args.budget_s is not None else (120 if args.smoke else 420)
    budget = Budget(seconds if args.budget_cap_s is None else min(seconds, args.budget_cap_s))
    log_path = Path(args.log) if args.log else (Path(os.environ["OUT"]) / "gpu_check.log" if os.environ.get("OUT")
                                                  else None)
    log = Log(log_path)
    how = import_zoo_evaluate()
    import pyautoattack

    if args.device is None and not args.smoke and not torch.cuda.is_available():
        print("error: the full-size bench needs a GPU, but PyTorch sees none (torch.cuda.is_available() is False)\n"
              "  fix: run it where CUDA is visible, pass --smoke for tiny sizes on a CPU, or --device cpu to "
              "measure the full sizes on the CPU anyway", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()})")
    log(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {gpu}  torch {torch.__version__}  "
        f"CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version() if device.type == 'cuda' else '-'}  "
        f"pyautoattack {pyautoattack.__version__}  python {platform.python_version()}")
    log(f"# zoo.evaluate from the {how}; budget {budget.seconds:.0f} s{'; SMOKE sizes' if args.smoke else ''}")
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": gpu, "torch": torch.__version__,
              "cuda": torch.version.cuda, "pyautoattack": pyautoattack.__version__, "smoke": args.smoke,
              "assumed_points": {"apgd-ce": SCORE_CLEAN_POINTS, "later stages": LATER_STAGE_POINTS}}

    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    log(f"# measured sizes: APGD-CE {sizes.apgd_iter} it; APGD-T {sizes.targets} targets x {sizes.apgd_iter} it; "
        f"FAB-T {sizes.targets} targets x {sizes.fab_iter} it; Square {sizes.square_queries} queries "
        "(full: read from pyautoattack's standard settings)")
    runs = [ModelRun("WRN-28-10", sizes,
                     [Variant("reference", "fp32"), Variant("native", "fp32"), Variant("native", "bf16"),
                      Variant("reference", "tf32"), Variant("native", "tf32"), Variant("robustbench", "default")])]
    if args.torch_compile:
        runs[0].variants.append(Variant("native-compiled", "bf16" if device.type == "cuda" else "fp32"))
        runs[0].compile_mode = args.torch_compile
    if args.smoke:
        runs[0].label = f"WRN-{sizes.depth}-{sizes.width} (smoke stand-in for WRN-28-10)"
    if args.wrn_70_16:
        big = SMOKE_70_16 if args.smoke else GPU_70_16
        label = "WRN-70-16" if not args.smoke else f"WRN-{big.depth}-{big.width} (smoke stand-in for WRN-70-16)"
        runs.append(ModelRun(label, big, [Variant("reference", "tf32"), Variant("native", "tf32"),
                                          Variant("native", "bf16")]))
    failures: list[str] = []
    try:
        for i, run in enumerate(runs):
            if i and budget.left() < 90:
                log(f"\n== {run.label}: not measured, {budget.left():.0f} s of the budget left")
                continue
            try:
                bench_model(run, device, budget, log, rb_row=any(v.engine == "robustbench" for v in run.variants),
                            channels_last=not args.no_channels_last, eps_override=args.eps)
            except KeyboardInterrupt:
                raise
            except Exception as exc:   # report what was measured before the failure, and say it failed
                from zoo.evaluate import devices

                if devices.is_out_of_memory(exc):
                    devices.empty_cache()
                    log(f"  {run.label}: out of GPU memory while setting up")
                else:
                    failures.append(f"{run.label}: {type(exc).__name__}: {exc}")
                    log(f"\n!! {run.label} failed: {type(exc).__name__}: {exc}")
                    log("".join(traceback.format_exception(exc)).rstrip())
    except KeyboardInterrupt:
        log(f"\n!! interrupted after {budget.elapsed():.0f} s: reporting what was measured")
    report(runs, log)
    if log_path is not None:
        write_json(runs, log_path.with_suffix(".json"), header)
    failed_rows = [f"{r.model} {r.stage} {r.variant.name}" for run in runs for r in run.rows
                   if r is not None and r.note.startswith("FAILED")]
    for what in failures + failed_rows:
        log(f"# FAILED: {what}")
    log(f"\n# {budget.elapsed():.0f} s in all")
    return 1 if failures or failed_rows else 0


if __name__ == "__main__":
    sys.exit(main())
