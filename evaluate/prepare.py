"""Checking and assembling everything a run needs before any attack runs (the run's ``Setup``).

Cheap checks come first (threat, eps, attacks, device, results folder), then data, then the model, so a bad
flag fails in a second with one message naming the fix, and nothing is written anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import zoo
from zoo import constants, registry
from zoo.errors import BadInputError, UnknownModelError, ZooError

from . import data as data_mod
from .compiled import COMPILE_MODES
from .engine import KNOWN_ATTACKS, NORMS, VERSIONS, AttackView, engine_class
from .sharding import DistributedEnv, distributed_env, parse_shard, shard_bounds
from .state import config_hash

DEFAULT_EPS = {"linf": "8/255", "l2": "0.5", "l1": "12"}
PRECISIONS = ("fp32", "tf32", "bf16")
CPU_BATCH_SIZE = 250          # pyautoattack's own default
MAX_PROBED_BATCH = 1024
PROBE_MEMORY_FRACTION = 0.5   # leave half the GPU for the attacks' own buffers
DEFAULT_CHUNK_BATCHES = 4
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# ---------------------------------------------------------------- the setup


@dataclass
class Setup:
    """Everything a run needs, validated, before any attack runs."""

    model: nn.Module
    label: str
    model_kind: str                  # registry | module
    model_dataset: str               # dataset the model was trained for (variant to load)
    checkpoint: dict[str, Any]
    data: data_mod.EvalData
    num_classes: int
    threat: str
    norm: str
    eps_text: str
    eps: float
    version: str
    attacks: tuple[str, ...]
    seed: int
    batch_size: int
    batch_auto: bool
    device_batch: int | None         # most points one forward+backward may hold on this GPU (None: no limit)
    precision: str
    device: torch.device
    channels_last: bool
    torch_compile: str | None        # torch.compile mode of the attacks' model passes (None: eager)
    engine_name: str
    engine_version: str
    results_dir: Path
    run_dir_arg: Path | None
    shard: tuple[int, int]
    dist: DistributedEnv | None
    chunk_batches: int
    progress: bool
    invocation: dict[str, Any]
    reported: dict[str, float] = field(default_factory=dict)
    attack_model: nn.Module | None = None   # what the attacks call: the model or its compiled form (runner)
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    run_dir: Path = Path(".")

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def is_rank0(self) -> bool:
        return self.dist is None or self.dist.rank == 0


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise BadInputError(f"unknown {what} {value!r}", hint=f"use one of {', '.join(choices)}")
    return value


def _parse_eps(eps: str | float | int | None, default: str) -> tuple[str, float]:
    text = default if eps is None else str(eps).strip()
    try:
        value = registry.parse_eps(text if eps is None or isinstance(eps, str) else eps)
    except ValueError:
        raise BadInputError(f"cannot parse eps {eps!r}", hint="use a number or a fraction like 8/255") from None
    if not np.isfinite(value) or value <= 0:
        raise BadInputError(f"eps must be positive, got {eps!r}", hint="e.g. --eps 8/255 for linf, 0.5 for l2")
    return text, value


def _resolve_attacks(version: str, attacks: Sequence[str] | str | None, norm: str, engine: str) -> tuple[str, ...]:
    _check_choice(version, VERSIONS, "version")
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if version != "custom":
        if attacks:
            raise BadInputError(f"an attack list was given with version {version!r}, which fixes its own attacks",
                                hint="use version 'custom' (--version custom) to choose the attacks")
        return tuple(engine_class(engine).attacks_for(version, norm))
    if not attacks:
        raise BadInputError("version 'custom' needs an attack list", hint="pass --attacks apgd-ce,apgd-t")
    unknown = [a for a in attacks if a not in KNOWN_ATTACKS]
    if unknown:
        raise BadInputError(f"unknown attack(s) {unknown}", hint=f"choose from {', '.join(KNOWN_ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise BadInputError(f"attack list {list(attacks)} repeats an attack",
                            hint="AutoAttack runs each attack once; list each at most once")
    return tuple(attacks)


def _resolve_device(device: str | torch.device | None, dist: DistributedEnv | None) -> torch.device:
    local = dist.local_rank if dist is not None else 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {device} asked for a GPU, but PyTorch sees none "
                                "(torch.cuda.is_available() is False)",
                                hint="use --device cpu, or install a CUDA build of PyTorch on a GPU machine")
        if dev.index is None:
            dev = torch.device("cuda", local)
        if dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {dev} does not exist: {torch.cuda.device_count()} GPU(s) visible",
                                hint="use cuda:0 .. cuda:N-1, or set CUDA_VISIBLE_DEVICES")
    elif dev.type != "cpu":
        raise BadInputError(f"device {dev} is not supported", hint="use cpu or cuda[:N]")
    return dev


def _check_writable(folder: Path) -> None:
    """Fail before any attack runs if results could not be written there (creates nothing lasting)."""
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    fix = "pass --results-dir with a folder you can write to"
    if not probe.is_dir():
        raise BadInputError(f"cannot write results under {folder}: {probe} is a file, not a folder", hint=fix)
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".zoo-eval-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise BadInputError(f"cannot write results under {folder}: {probe} is not writable ({exc.strerror})",
                            hint=fix) from None


def _weights_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights, for modules that did not come from a checkpoint file."""
    return _tensors_sha256(model.state_dict().items())


def _module_sha256(model: nn.Module) -> str:
    """A fingerprint of what the weights do not fix: the module's structure (its repr: layers, activations)
    and every buffer, non-persistent ones (e.g. normalisation mean/std) included."""
    digest = hashlib.sha256(repr(model).encode())
    digest.update(_tensors_sha256(model.named_buffers()).encode())
    return digest.hexdigest()


def _tensors_sha256(named: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def invocation_kwargs(invocation: dict[str, Any]) -> dict[str, Any]:
    """The ``run``/``prepare`` keyword arguments a run folder's saved invocation stands for (resume, merge)."""
    same = ("threat", "eps", "n_ex", "data", "data_dir", "version", "attacks", "seed", "batch_size", "precision",
            "engine", "results_dir", "checkpoint", "channels_last")
    return {"dataset": invocation["model_dataset"], "model_label": invocation.get("model_label"),
            "device": invocation.get("device"), "torch_compile": invocation.get("torch_compile"),
            **{k: invocation[k] for k in same}}


def _registry_variant(model_or_name: Any, model_dataset: str, threat: str,
                      checkpoint: str | Path | None) -> registry.Variant | None:
    """The registry entry a run will evaluate (None for modules and RobustBench names). Unknown names,
    variants and missing checkpoint files fail here, before any data or weights are downloaded."""
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise BadInputError(f"checkpoint file {checkpoint} does not exist",
                            hint="pass the path of a downloaded .pt/.pth/.safetensors file")
    if not isinstance(model_or_name, str):
        return None
    try:
        return registry.info(model_or_name).variant(model_dataset, threat)
    except UnknownModelError:
        from zoo import robustbench_compat
        if checkpoint is not None or not robustbench_compat.is_robustbench_name(model_or_name, model_dataset, threat):
            raise
    return None


def _load_model(model_or_name: Any, variant: registry.Variant | None, model_dataset: str, threat: str,
                checkpoint: str | Path | None, model_label: str | None
                ) -> tuple[nn.Module, str, str, dict[str, Any], dict[str, float]]:
    """(module, label, kind, checkpoint info, reported accuracies) for a registry name or a module."""
    reported: dict[str, float] = dict(variant.reported) if variant else {}
    if isinstance(model_or_name, str):
        name = model_or_name
        label = registry.resolve_name(name) if variant else name  # RobustBench names keep their own
        model = zoo.load(name, dataset=model_dataset, threat=threat, checkpoint=checkpoint)
        kind = "registry"
    elif isinstance(model_or_name, nn.Module):
        model = model_or_name
        label = model_label or type(model).__name__
        kind = "module"
    else:
        raise BadInputError(f"model must be a registry name or a torch.nn.Module, got {type(model_or_name).__name__}")
    if model_label is not None:
        label = model_label
    if not _LABEL.match(label):
        raise BadInputError(f"model label {label!r} cannot name a results folder",
                            hint="use letters, digits and . _ + - only")
    fetched = getattr(model, "checkpoint_info", None)
    if fetched is not None:
        info = {"source": str(fetched.source), "sha256": fetched.sha256, "path": str(fetched.path)}
    elif checkpoint is not None:
        from zoo.fetch import fetch_local
        f = fetch_local(checkpoint)
        info = {"source": f.source, "sha256": f.sha256, "path": str(f.path)}
    else:
        info = {"source": "in-memory module", "sha256": None, "path": None}
    info["weights_sha256"] = _weights_sha256(model)
    info["module_sha256"] = _module_sha256(model)
    return model, label, kind, info, reported


def _prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Eval mode, frozen weights (backward computes input gradients only), on device, memory format."""
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _check_outputs(model: nn.Module, data: data_mod.EvalData, device: torch.device) -> int:
    """Number of classes the model outputs; refuses outputs of the wrong shape or with NaN."""
    x = data.x[: min(len(data), 4)].to(device)
    with torch.no_grad(), strict_fp32(device):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInputError(f"the model returned {shape} for {len(x)} images; expected a logits tensor of shape "
                            f"({len(x)}, num_classes)", hint="wrap the model so forward() returns logits only")
    if data.num_classes is not None and out.shape[1] != data.num_classes:
        raise BadInputError(f"the model outputs {out.shape[1]} logits, but {data.dataset} has {data.num_classes} "
                            "classes", hint="pick the checkpoint trained on this data set (--dataset)")
    if not torch.isfinite(out).all():
        raise BadInputError("the model outputs NaN or infinite logits on clean test images",
                            hint="the checkpoint is broken or does not match the architecture")
    return int(out.shape[1])


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """TF32 on for 'tf32', off otherwise (PyTorch enables it for cuDNN convolutions by default)."""
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    with precision_mode("fp32", device):
        yield


def tf32_in_effect(precision: str, device: torch.device) -> dict[str, bool]:
    on = device.type == "cuda" and precision == "tf32"
    return {"matmul": on, "cudnn": on}


def _choose_batch_size(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, n: int,
                       precision: str) -> int:
    """Largest of c, c/2, c/4, ... (c = min(n, 1024)) whose forward+backward uses at most half the GPU.

    Measured against the card's total memory, not what is free right now, so every shard of a run on the
    same GPU model picks the same B (B is part of the configuration: it fixes AutoAttack's batches).
    """
    total = torch.cuda.get_device_properties(device).total_memory
    view = AttackView(model, torch.bfloat16 if precision == "bf16" else None)
    b = min(n, MAX_PROBED_BATCH)
    while b >= 1:
        fits = False
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            x = torch.rand(b, *image_shape, device=device, requires_grad=True)
            with torch.enable_grad(), precision_mode(precision, device):
                torch.autograd.grad(view(x).sum(), x)
            fits = torch.cuda.max_memory_allocated(device) - base <= PROBE_MEMORY_FRACTION * total
        except torch.cuda.OutOfMemoryError:
            pass
        x = None  # free the probe before measuring the next size
        if fits:
            torch.cuda.empty_cache()
            return b
        b //= 2
    raise ZooError(f"not even one image fits a forward+backward pass on {device}",
                   hint="use a GPU with more memory or --device cpu")


def prepare(model_or_name: Any, *, dataset: str, threat: str, eps, n_ex, data, data_dir, version: str,
             attacks, seed: int, batch_size: int | None, device, precision: str, engine: str, results_dir,
             run_dir, checkpoint, shard, model_label, chunk_batches: int, channels_last: bool | None,
             progress: bool | None, torch_compile: str | None = None) -> Setup:
    threat = _check_choice(str(threat).lower(), tuple(NORMS), "threat")
    norm = NORMS[threat]
    _check_choice(precision, PRECISIONS, "precision")
    if torch_compile is not None:
        _check_choice(torch_compile, COMPILE_MODES, "torch.compile mode")
    engine_cls = engine_class(engine)
    attack_list = _resolve_attacks(version, attacks, norm, engine)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BadInputError(f"seed must be a non-negative integer, got {seed!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size <= 0):
        raise BadInputError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, (int, np.integer)) or chunk_batches <= 0:
        raise BadInputError(f"chunk size must be a positive number of batches, got {chunk_batches!r}")
    dist = distributed_env()
    if shard is not None and dist is not None:
        raise BadInputError("--shard cannot be combined with torchrun (it shards by RANK/WORLD_SIZE already)")
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is None:
        shard = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    shard = (int(shard[0]), int(shard[1]))
    if not 0 <= shard[0] < shard[1]:
        raise BadInputError(f"shard {shard[0]}/{shard[1]}: need 0 <= I < K")
    dev = _resolve_device(device, dist)
    if dev.type == "cpu" and precision != "fp32":
        raise BadInputError(f"precision {precision} needs a GPU; on CPU only fp32 is meaningful",
                            hint="drop --precision or use --device cuda")
    results_dir = Path(results_dir).expanduser()
    _check_writable(results_dir)

    model_dataset = dataset
    variant = _registry_variant(model_or_name, model_dataset, threat, checkpoint)
    eps_text, eps_value = _parse_eps(eps, variant.eps if variant else DEFAULT_EPS[threat])

    evaldata = data_mod.load(dataset, n_ex, data, data_dir)
    shard_bounds(len(evaldata), shard[1])  # refuses more shards than examples before loading the model
    model, label, kind, ckpt, reported = _load_model(model_or_name, variant, model_dataset, threat, checkpoint,
                                                     model_label)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    model = _prepare_model(model, dev, bool(channels_last))
    num_classes = _check_outputs(model, evaldata, dev)
    data_mod.check_labels(evaldata, num_classes)
    batch_auto = batch_size is None
    # Engines that merge reference batches (native) must not exceed what one pass can hold on the GPU.
    device_batch = None if dev.type != "cuda" else _choose_batch_size(
        model, tuple(evaldata.x.shape[1:]), dev, len(evaldata), precision)
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if device_batch is None else device_batch
    invocation = {
        "model": label if kind == "module" else model_or_name, "model_kind": kind, "model_dataset": model_dataset,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).expanduser().resolve()),
        "threat": threat, "eps": eps_text, "n_ex": len(evaldata),
        "data": None if data is None else str(Path(data).expanduser().resolve()),
        "data_dir": None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
        "version": version, "attacks": list(attack_list) if version == "custom" else None, "seed": int(seed),
        "precision": precision, "engine": engine, "results_dir": str(results_dir.resolve()),
        "channels_last": bool(channels_last), "model_label": model_label, "device": dev.type,
        "torch_compile": torch_compile,
    }
    if progress is None:
        progress = True
    setup = Setup(model=model, label=label, model_kind=kind, model_dataset=model_dataset, checkpoint=ckpt,
                  data=evaldata, num_classes=num_classes, threat=threat, norm=norm, eps_text=eps_text, eps=eps_value,
                  version=version, attacks=attack_list, seed=int(seed), batch_size=int(batch_size),
                  batch_auto=batch_auto, device_batch=device_batch, precision=precision, device=dev, channels_last=bool(channels_last),
                  torch_compile=torch_compile, engine_name=engine, engine_version=_engine_version(engine_cls), results_dir=results_dir,
                  run_dir_arg=None if run_dir is None else Path(run_dir).expanduser(), shard=shard, dist=dist,
                  chunk_batches=int(chunk_batches), progress=progress, invocation=invocation, reported=reported)
    configure(setup)
    return setup


def _engine_version(engine_cls) -> str:
    version = getattr(engine_cls, "version", None)
    if isinstance(version, str):
        return version
    if engine_cls.__name__ == "ReferenceEngine":
        import pyautoattack
        return pyautoattack.__version__
    return "unknown"


def library_versions() -> dict[str, str]:
    import pyautoattack
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "pyautoattack": pyautoattack.__version__, "score-zoo": zoo.__version__, "numpy": np.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version()
        if cudnn:
            out["cudnn"] = str(cudnn)
    return out


def configure(setup: Setup) -> None:
    """The configuration hash (what must match to resume) and the run folder it selects."""
    libs = library_versions()
    setup.config = {
        "model": setup.label,
        "checkpoint_sha256": setup.checkpoint.get("sha256") or setup.checkpoint["weights_sha256"],
        "weights_sha256": setup.checkpoint["weights_sha256"], "module_sha256": setup.checkpoint["module_sha256"],
        "shards": setup.shard[1],
        "dataset": setup.data.dataset, "data_sha256": setup.data.content_sha256,
        "indices": list(setup.data.indices), "eps": setup.eps, "norm": setup.norm, "version": setup.version,
        "attacks": list(setup.attacks), "seed": setup.seed, "batch_size": setup.batch_size,
        "precision": setup.precision, "engine": setup.engine_name, "engine_version": setup.engine_version,
        "torch": libs["torch"], "pyautoattack": libs["pyautoattack"], "score_zoo": libs["score-zoo"],
        "device_type": setup.device.type, "channels_last": setup.channels_last,
    }
    if setup.torch_compile is not None:  # compiled kernels round differently from eager ones
        setup.config["torch_compile"] = setup.torch_compile
    setup.config_hash = config_hash(setup.config)
    setup.invocation["batch_size"] = setup.batch_size
    setup.run_dir = setup.run_dir_arg or constants.cache_dir() / "runs" / setup.config_hash[:16]
