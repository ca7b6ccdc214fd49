"""What the CPU can do for a run: native bf16 arithmetic, and how many threads each process may use.

bf16 autocast on a CPU is only worth it where the hardware computes in bf16 (Intel AMX-BF16 or AVX512-BF16:
oneDNN then runs bf16 convolutions and matrix products natively, ~4x faster than fp32 for a WRN). Elsewhere
PyTorch emulates bf16 and a bf16 run would be slower than fp32, so the run is refused.

Threads: a process's intra-op threads default to the cores it may run on (``os.sched_getaffinity``) divided
by the evaluation processes that share this machine, so torchrun ranks or hand-started ``--shard`` jobs never
oversubscribe the cores (see :func:`local_processes` for what is assumed).
"""

from __future__ import annotations

import os
from pathlib import Path

#: /proc/cpuinfo flags of native bf16 arithmetic (x86: AMX tiles, AVX512-BF16; ARM: the BF16 extension).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16() -> str | None:
    """The flag that makes bf16 fast on this CPU (e.g. 'amx_bf16'), or None when bf16 would be emulated."""
    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)


def cpu_model() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroups, Slurm's binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


def local_processes(shard: tuple[int, int] | None, torchrun_local_world: int | None) -> int:
    """How many evaluation processes are assumed to share this machine's cores.

    - under torchrun: LOCAL_WORLD_SIZE (the ranks torchrun started on this node);
    - inside a Slurm job (SLURM_JOB_ID set, e.g. ``--slurm``): 1, because Slurm already binds each task to
      its own CPUs, which the affinity mask reflects;
    - ``--shard I/K`` otherwise: K, i.e. all K shard jobs are assumed to run on this machine at once (the
      case of a hand-started split). Shards run one after another, or on separate machines, should pass
      ``--threads`` explicitly;
    - otherwise 1.
    """
    if torchrun_local_world:
        return max(1, int(torchrun_local_world))
    if os.environ.get("SLURM_JOB_ID"):
        return 1
    if shard is not None and shard[1] > 1:
        return int(shard[1])
    return 1


def default_threads(shard: tuple[int, int] | None, torchrun_local_world: int | None) -> int:
    """available cores // local processes, at least 1, and never more than the process already allows itself
    (``torch.set_num_threads`` / OMP_NUM_THREADS set lower by the caller are kept: same threads, same rounding)."""
    import torch

    share = max(1, available_cores() // local_processes(shard, torchrun_local_world))
    return max(1, min(share, torch.get_num_threads()))


def resolve_threads(threads: int | None, shard: tuple[int, int], under_torchrun: bool) -> int:
    """``threads`` when given, else :func:`default_threads` (torchrun's LOCAL_WORLD_SIZE read here)."""
    if threads is not None:
        return int(threads)
    local_world = None
    if under_torchrun:
        try:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "") or 0) or None
        except ValueError:
            local_world = None
        if local_world is None:   # a launcher that sets only WORLD_SIZE: assume every rank is here
            local_world = shard[1]
    return default_threads(None if under_torchrun else shard, local_world)


def check_cpu_precision(precision: str) -> None:
    """Refuse a precision this CPU cannot run fast: tf32 is a GPU mode; bf16 needs native bf16 arithmetic."""
    from zoo.errors import BadInputError

    if precision == "tf32":
        raise BadInputError("precision tf32 needs a GPU (TF32 is a CUDA tensor-core mode)",
                            hint="use --precision fp32 on a CPU, or --device cuda")
    if precision == "bf16" and native_bf16() is None:
        raise BadInputError(f"precision bf16 needs a GPU or a CPU with native bf16 arithmetic (AMX-BF16 or "
                            f"AVX512-BF16); this CPU ({cpu_model()}) would emulate it, slower than fp32",
                            hint="use --precision fp32 (or --device cuda)")
