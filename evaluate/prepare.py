"""Checking and assembling everything a run needs before any attack runs (the run's ``Setup``).

Cheap checks come first (threat, eps, attacks, device, results folder), then data, then the model, so a bad
flag fails in a second with one message naming the fix, and nothing is written anywhere. The ``Setup`` is
immutable; what may change while a run goes on (the device-batch cap, compiled graphs) lives in the
runner's own state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import zoo
from zoo import constants, registry, robustbench_compat
from zoo.domain import NORM_THREATS, NORMS, PRECISIONS, THREAT_TABLE, THREATS, parse_eps
from zoo.errors import BadInputError, UnknownModelError, ZooError
from zoo.models import build_model

from . import data as data_mod
from . import cpus, cross_threat, devices, model_source
from .attacks.compiled import COMPILE_MODES
from .attacks.engine import KNOWN_ATTACKS, VERSIONS, AttackView, Engine, engine_class, make_engine
from .options import RunOptions, hashed_values
from .precision import autocast_dtype, precision_mode, strict_fp32
from .sharding import DistributedEnv, distributed_env, parse_shard, shard_bounds
from .state import config_hash

MAX_DEVICE_BATCH = 1024
PROBE_MEMORY_FRACTION = 0.5   # leave half the GPU for the attacks' own buffers
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MAX_LABEL_LENGTH = 100


# ---------------------------------------------------------------- the setup


@dataclass(frozen=True)
class Setup:
    """Everything a run needs, validated, before any attack runs. ``opts`` holds the resolved options (the
    eps text, the number of examples, the attack list of a custom version, absolute paths, the device type)."""

    opts: RunOptions
    model: nn.Module
    label: str
    model_kind: str                  # registry | robustbench | factory | module (see model_source)
    checkpoint: dict[str, Any]
    data: data_mod.EvalData
    num_classes: int
    norm: str
    eps: float
    attacks: tuple[str, ...]
    engine_version: str
    device: torch.device
    shard: tuple[int, int]
    dist: DistributedEnv | None
    device_batch: int | None         # most points one forward+backward may hold on this GPU (None: no limit)
    reported: dict[str, float]
    invocation: dict[str, Any]
    config: dict[str, Any]
    config_hash: str                 # "" when planning
    run_dir: Path | None             # None when planning without --run-dir

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def is_rank0(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    @property
    def results_dir(self) -> Path:
        return Path(self.opts.results_dir)

    def engine(self, model: nn.Module, max_device_batch: int | None = None, precision: str | None = None) -> Engine:
        """The run's attack engine over ``model`` (the attacks' view of the network); ``precision`` overrides
        the run's (bf16 runs keep an fp32 engine for the points bf16 cannot attack, see ``bf16.py``)."""
        o = self.opts
        return make_engine(o.engine, model, norm=self.norm, eps=self.eps, version=o.version,
                           attacks=list(self.attacks), seed=o.seed, device=self.device,
                           precision=precision or o.precision, max_device_batch=max_device_batch)


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise BadInputError(f"unknown {what} {value!r}", hint=f"use one of {', '.join(choices)}")
    return value


def _parse_eps(eps: str | float | int | None, default: str) -> tuple[str, float]:
    text = default if eps is None else str(eps).strip()
    try:
        value = parse_eps(text if eps is None or isinstance(eps, str) else eps)
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
    """The device this process runs on. Under torchrun each rank takes GPU LOCAL_RANK (made current), so
    an explicit index (which would put every rank on one GPU) is refused there."""
    local = dist.local_rank if dist is not None else 0
    if device is None:
        device = "cuda" if devices.available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not devices.available():
            raise BadInputError(f"--device {device} asked for a GPU, but PyTorch sees none "
                                "(torch.cuda.is_available() is False)",
                                hint="use --device cpu, or install a CUDA build of PyTorch on a GPU machine")
        if dev.index is not None and dist is not None:
            raise BadInputError(f"--device {dev} names one GPU, but torchrun started {dist.world_size} processes "
                                "(every rank would use that GPU)",
                                hint="pass --device cuda: each rank then uses GPU LOCAL_RANK (choose the GPUs "
                                     "with CUDA_VISIBLE_DEVICES)")
        index = local if dev.index is None else dev.index
        if index >= devices.count():
            raise BadInputError(f"--device cuda:{index} does not exist: {devices.count()} GPU(s) visible",
                                hint="use cuda:0 .. cuda:N-1, or set CUDA_VISIBLE_DEVICES"
                                     + (" (one GPU per torchrun process: --nproc-per-node <= GPUs)"
                                        if dist is not None else ""))
        dev = devices.gpu(index)
        if dist is not None:   # kernels and caches of libraries that use "the current GPU" go to this rank's
            devices.set_current(dev)
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


def check_label(label: str) -> str:
    """A model label names a results folder: one path component of sane length, nothing a shell or a file
    system would misread (``fullmatch``: ``$`` alone would accept a trailing newline)."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label) or len(label) > MAX_LABEL_LENGTH:
        shown = label if not isinstance(label, str) or len(label) <= 40 else label[:40] + "..."
        raise BadInputError(f"model label {shown!r} cannot name a results folder",
                            hint=f"use 1-{MAX_LABEL_LENGTH} letters, digits and . _ + - (starting with a letter or "
                                 "digit)")
    return label


def check_eps_range(eps: float, norm: str, dims: int, allow_large: bool) -> None:
    """Refuse budgets past which every image in [0, 1] is reachable (a typo such as 8 for 8/255)."""
    limit = {"Linf": 1.0, "L2": dims ** 0.5, "L1": float(dims)}[norm]
    if eps >= limit and not allow_large:
        raise BadInputError(f"eps {eps:g} covers the whole {norm} image space of [0, 1]^{dims} (limit {limit:.4g}); "
                            "every image would be reachable", hint="did you mean a fraction like 8/255? Pass "
                                                                  "--allow-large-eps if this is intended")


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


def _registry_variant(model_or_name: Any, model_dataset: str, threat: str, checkpoint: str | Path | None,
                      trained_threat: str | None = None) -> registry.Variant | None:
    """The registry entry a run will evaluate (None for modules and RobustBench names). Unknown names,
    variants and missing checkpoint files fail here, before any data or weights are downloaded."""
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise BadInputError(f"checkpoint file {checkpoint} does not exist",
                            hint="pass the path of a downloaded .pt/.pth/.safetensors file")
    if not isinstance(model_or_name, str):
        return None
    kind = model_source.kind_of(model_or_name)
    if kind == "robustbench" and checkpoint is not None:
        raise BadInputError("--checkpoint cannot replace a RobustBench model's weights",
                            hint="use --model-factory with --checkpoint for your own architecture and weights")
    if kind == "robustbench" and not robustbench_compat.is_robustbench_name(
            model_source.default_label(model_or_name), model_dataset, threat):
        raise UnknownModelError(f"RobustBench lists no {model_dataset} {threat} model "
                                f"{model_source.default_label(model_or_name)!r} (or RobustBench is not installed)",
                                hint="pip install 'score-zoo[robustbench]'; ids as on robustbench.github.io")
    if kind != "registry":
        return None
    try:
        info = registry.info(model_or_name)
    except UnknownModelError:
        if checkpoint is not None or not robustbench_compat.is_robustbench_name(model_or_name, model_dataset, threat):
            raise
        return None
    return cross_threat.pick_variant(info, model_dataset, threat, trained_threat)


def _load_model(model_or_name: Any, variant: registry.Variant | None, model_dataset: str, threat: str,
                checkpoint: str | Path | None, model_label: str | None, planning: bool = False
                ) -> tuple[nn.Module, str, str, dict[str, Any], dict[str, float]]:
    """(module, label, kind, checkpoint info, reported accuracies) for a model string (see model_source)
    or a module. ``planning``: the architecture with untrained weights, nothing downloaded or read."""
    reported: dict[str, float] = dict(variant.reported) if variant and variant.threat == threat else {}
    threat = variant.threat if variant else threat   # the checkpoint trained for it (cross_threat)
    if isinstance(model_or_name, str):
        name = model_or_name
        kind = model_source.kind_of(name)
        if kind == "factory":
            model = model_source.build_factory(name, None if planning else checkpoint)
            label = model_source.default_label(name)
        elif kind == "robustbench" or (kind == "registry" and variant is None):
            label = model_source.default_label(name)   # RobustBench names keep their own
            model = robustbench_compat.architecture(label, model_dataset, threat) if planning else \
                robustbench_compat.load(label, model_dataset, threat)
        else:
            label = registry.resolve_name(name)
            model = build_model(registry.info(name), variant) if planning else \
                zoo.load(name, dataset=model_dataset, threat=threat, checkpoint=checkpoint)
    elif isinstance(model_or_name, nn.Module):
        model = model_or_name
        label = model_label or type(model).__name__
        kind = "module"
    else:
        raise BadInputError(f"model must be a registry name or a torch.nn.Module, got {type(model_or_name).__name__}")
    label = check_label(model_label if model_label is not None else label)
    fetched = getattr(model, "checkpoint_info", None)
    if planning and kind != "module":
        info = {"source": "not loaded: planning needs no weights", "sha256": None, "path": None,
                "provenance": None}
    elif fetched is not None:
        info = {"source": str(fetched.source), "sha256": fetched.sha256, "path": str(fetched.path),
                "provenance": fetched.provenance}
    elif checkpoint is not None:
        from zoo.fetch import fetch_local
        f = fetch_local(checkpoint)
        info = {"source": f.source if kind != "factory" else f"{model_source.factory_source(model_or_name)} + "
                f"{f.source}", "sha256": f.sha256, "path": str(f.path), "provenance": f.provenance}
    elif kind == "factory":
        info = {"source": model_source.factory_source(model_or_name), "sha256": None, "path": None,
                "provenance": "local-unverified"}
    elif kind == "robustbench":
        info = {"source": f"RobustBench model zoo ({label})", "sha256": None, "path": None,
                "provenance": "local-unverified"}
    else:
        info = {"source": "in-memory module", "sha256": None, "path": None, "provenance": "local-unverified"}
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


def probe_device_batch(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, n: int,
                       precision: str) -> int:
    """Largest of c, c/2, c/4, ... (c = min(n, 1024)) whose forward+backward uses at most half the GPU.

    It caps how many points one device pass may hold (merged reference batches), never the batch size B,
    which defines the result, and is not part of the configuration (ranks on different GPUs may probe
    different caps and still run the same configuration). Measured against the card's total memory, not
    what is free right now.
    """
    total = devices.total_memory(device)
    view = AttackView(model, autocast_dtype(precision))
    b = min(n, MAX_DEVICE_BATCH)
    while b >= 1:
        fits = False
        try:
            devices.synchronize(device)
            devices.empty_cache()
            devices.reset_peak_memory(device)
            base = devices.memory_allocated(device)
            x = torch.rand(b, *image_shape, device=device, requires_grad=True)
            with torch.enable_grad(), precision_mode(precision, device):
                torch.autograd.grad(view(x).sum(), x)
            fits = devices.max_memory_allocated(device) - base <= PROBE_MEMORY_FRACTION * total
        except Exception as exc:
            if not devices.is_out_of_memory(exc):
                raise
        x = None  # free the probe before measuring the next size
        if fits:
            devices.empty_cache()
            return b
        b //= 2
    raise ZooError(f"not even one image fits a forward+backward pass on {device}",
                   hint="use a GPU with more memory or --device cpu")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise BadInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _resolve_shard(shard: Any, dist: DistributedEnv | None) -> tuple[int, int]:
    if shard is not None and dist is not None:
        raise BadInputError("--shard cannot be combined with torchrun (it shards by RANK/WORLD_SIZE already)")
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is None:
        shard = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    shard = (int(shard[0]), int(shard[1]))
    if not 0 <= shard[0] < shard[1]:
        raise BadInputError(f"shard {shard[0]}/{shard[1]}: need 0 <= I < K")
    return shard


def _absolute(path: Any) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def prepare(model_or_name: Any, options: RunOptions, *, attacking: bool = True, planning: bool = False) -> Setup:
    """The run's Setup. ``attacking=False`` (merge) skips what only attacking needs: the GPU memory probe
    and the precision check (a bf16 run's shards may be merged on any CPU). ``planning`` (--dry-run)
    downloads and reads nothing it can do without: the architecture with untrained weights, the data's count
    and shape; its Setup has no configuration hash and no run folder unless one was given."""
    o = options
    threat = _check_choice(str(o.threat).lower(), THREATS, "threat")
    if threat not in NORMS:
        raise BadInputError(f"threat {threat!r} has no norm ball for AutoAttack",
                            hint="zoo.evaluate.corruptions.run evaluates it (zoo-eval --threat corruptions)")
    norm = NORMS[threat]
    if o.trained_threat is not None:
        _check_choice(o.trained_threat, NORM_THREATS, "trained threat")
    _check_choice(o.precision, PRECISIONS, "precision")
    if o.torch_compile is not None:
        _check_choice(o.torch_compile, COMPILE_MODES, "torch.compile mode")
    engine_cls = engine_class(o.engine)
    attack_list = _resolve_attacks(o.version, o.attacks, norm, o.engine)
    if isinstance(o.seed, bool) or not isinstance(o.seed, (int, np.integer)) or o.seed < 0:
        raise BadInputError(f"seed must be a non-negative integer, got {o.seed!r}")
    batch_size = _positive_int(o.batch_size, "batch size")
    if isinstance(o.chunk_batches, bool) or not isinstance(o.chunk_batches, (int, np.integer)) or o.chunk_batches <= 0:
        raise BadInputError(f"chunk size must be a positive number of batches, got {o.chunk_batches!r}")
    dist = distributed_env()
    shard = _resolve_shard(o.shard, dist)
    dev = _resolve_device(o.device, dist)
    if attacking and not devices.is_gpu(dev) and o.precision != "fp32":
        cpus.check_cpu_precision(o.precision)
    if o.threads is not None:
        _positive_int(o.threads, "threads")
    results_dir = Path(o.results_dir).expanduser()
    _check_writable(results_dir)

    if o.model_label is not None:
        check_label(o.model_label)   # before any download or data loading
    variant = _registry_variant(model_or_name, o.dataset, threat, o.checkpoint, o.trained_threat)
    eps_text, eps_value = _parse_eps(o.eps, variant.eps if variant and variant.threat == threat
                                     else THREAT_TABLE[threat].default_eps)

    evaldata = (data_mod.for_planning if planning else data_mod.load)(o.dataset, o.n_ex, o.data, o.data_dir,
                                                                      o.data_root)
    check_eps_range(eps_value, norm, int(np.prod(evaldata.x.shape[1:])), bool(o.allow_large_eps))
    shard_bounds(len(evaldata), shard[1])  # refuses more shards than examples before loading the model
    model, label, kind, ckpt, reported = _load_model(model_or_name, variant, o.dataset, threat, o.checkpoint,
                                                     o.model_label, planning)
    channels_last = devices.default_channels_last(dev, o.precision) if o.channels_last is None \
        else bool(o.channels_last)
    model = _prepare_model(model, dev, channels_last)
    num_classes = _check_outputs(model, evaldata, dev)
    data_mod.check_labels(evaldata, num_classes)
    # Engines that merge reference batches (native) must not exceed what one pass can hold on the GPU.
    device_batch = None if not (attacking and devices.is_gpu(dev)) else probe_device_batch(
        model, tuple(evaldata.x.shape[1:]), dev, len(evaldata), o.precision)
    resolved = dataclasses.replace(
        o, threat=threat, eps=eps_text, n_ex=len(evaldata), data=_absolute(o.data), data_dir=_absolute(o.data_dir),
        data_root=_absolute(o.data_root), trained_threat=variant.threat if variant else None,
        attacks=attack_list if o.version == "custom" else None, seed=int(o.seed), batch_size=batch_size,
        device=devices.kind(dev), results_dir=_absolute(results_dir), checkpoint=_absolute(o.checkpoint),
        channels_last=channels_last, chunk_batches=int(o.chunk_batches),
        threads=cpus.resolve_threads(o.threads, shard, dist is not None),
        progress=True if o.progress is None else bool(o.progress))
    invocation = invocation_of(model_or_name, label, kind, resolved)
    config, digest = {}, ""
    if not planning:   # the hash needs the weights' and the data's own hashes
        config = configuration(resolved, label=label, checkpoint=ckpt, data=evaldata, norm=norm, eps=eps_value,
                               attacks=attack_list, shards=shard[1], engine_version=engine_cls.engine_version())
        digest = config_hash(config)
    run_dir = None if planning and o.run_dir is None else run_folder(o.run_dir, digest)
    return Setup(opts=resolved, model=model, label=label, model_kind=kind, checkpoint=ckpt, data=evaldata,
                 num_classes=num_classes, norm=norm, eps=eps_value, attacks=attack_list,
                 engine_version=engine_cls.engine_version(), device=dev, shard=shard, dist=dist,
                 device_batch=device_batch, reported=reported, invocation=invocation, config=config,
                 config_hash=digest, run_dir=run_dir)


def invocation_of(model_or_name: Any, label: str, kind: str, resolved: RunOptions) -> dict[str, Any]:
    """What rebuilds the run (``zoo-eval verify``, merge): the model as named (an in-memory module by its
    label) and the resolved options."""
    return {"model": label if kind == "module" else model_or_name, "model_kind": kind, **resolved.invocation()}


def checkpoint_identity(checkpoint: dict[str, Any]) -> dict[str, str]:
    """The configuration's model identity: the checkpoint file's sha256 (the weights' own for an in-memory
    module), the weights' and the module's."""
    return {"checkpoint_sha256": checkpoint.get("sha256") or checkpoint["weights_sha256"],
            "weights_sha256": checkpoint["weights_sha256"], "module_sha256": checkpoint["module_sha256"]}


def run_folder(run_dir: str | Path | None, digest: str) -> Path:
    """``--run-dir``, or the cache's folder of this configuration."""
    return Path(run_dir).expanduser() if run_dir is not None else constants.cache_dir() / "runs" / digest[:16]


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


def configuration(resolved: RunOptions, *, label: str, checkpoint: dict[str, Any], data: data_mod.EvalData,
                  norm: str, eps: float, attacks: tuple[str, ...], shards: int, engine_version: str) -> dict[str, Any]:
    """What must match to resume a run: the options hashed by value (``options.hashed_values``) and the
    identities the others select (``DERIVED`` in ``options``: model label and weights, data content and
    indices, eps value, shard count), plus the library versions that compute the attacks."""
    libs = library_versions()
    return {
        **hashed_values(resolved), "attacks": list(attacks), "norm": norm,
        "model": label, **checkpoint_identity(checkpoint), "dataset": data.dataset,
        "data_sha256": data.content_sha256, "indices": list(data.indices), "eps": eps,
        "shards": shards, "engine_version": engine_version,
        "torch": libs["torch"], "pyautoattack": libs["pyautoattack"], "score_zoo": libs["score-zoo"],
    }
