"""Every option of an evaluation, declared once.

``run()`` and ``plan()`` take these as keyword arguments, ``zoo-eval`` builds its flags and defaults from them,
the run folder saves the ones that rebuild a run (resume, merge), and each one says how the configuration
hash — what makes resuming safe — covers it. ``tests/test_eval_options.py`` checks that no option is missing
from any of these. Pure Python (no torch), so the CLI's ``--help`` and the reports can read it cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: AutoAttack's batch size B when none is given: pyautoattack's own default, the same on every device, so a
#: run's result (B fixes the reference's batches and reseeding) never depends on the GPU it ran on.
DEFAULT_BATCH_SIZE = 250
DEFAULT_CHUNK_BATCHES = 4

# How the configuration hash covers an option (``hashed`` in the field metadata):
VALUE = "value"           # its resolved value is hashed as is
DERIVED = "derived"       # through what it selects (data content, checkpoint sha256, indices, eps value, label)
NOT_HASHED = "no"         # changes where or how the run works, never its result


def _option(default: Any, help: str, *, hashed: str, saved: bool = True, flag: str | None = "",
            type: Callable[[str], Any] | None = None, choices: Callable[[], Any] | None = None,
            metavar: str | None = None) -> Any:
    """A RunOptions field. ``flag``: "" derives --name-with-dashes, None means no CLI flag of that form
    (the CLI handles it itself); ``saved``: kept in the run folder's invocation for resume and merge."""
    return field(default=default, metadata={"help": help, "hashed": hashed, "saved": saved, "flag": flag,
                                            "type": type, "choices": choices, "metavar": metavar})


def _threats():
    from zoo.domain import THREATS
    return THREATS


def _norm_threats():
    from zoo.domain import NORM_THREATS
    return NORM_THREATS


def _precisions():
    from zoo.domain import PRECISIONS
    return PRECISIONS


def _versions():
    from .attacks.engine import VERSIONS
    return VERSIONS


def _engines():
    from .attacks.engine import ENGINES
    return tuple(ENGINES)


def _compile_modes():
    from .attacks.compiled import COMPILE_MODES
    return COMPILE_MODES


@dataclass(frozen=True)
class RunOptions:
    """What to evaluate and how. Defaults are the README's; ``None`` means "derived" as each help says."""

    dataset: str = _option("cifar10", "cifar10 or cifar100 (the test set, and the registry variant to load)",
                           hashed=DERIVED)
    threat: str = _option("linf", "threat model", hashed=VALUE, choices=_threats)
    trained_threat: str | None = _option(None, "evaluate the registry checkpoint trained for this threat under "
                                               "--threat (default: the one trained for --threat, else the data "
                                               "set's only checkpoint); the record names both",
                                         hashed=VALUE, choices=_norm_threats)
    eps: str | float | None = _option(None, "perturbation budget, e.g. 8/255 or 0.5 (default: the registry "
                                            "variant's, else 8/255 linf, 0.5 l2, 12 l1)", hashed=DERIVED)
    allow_large_eps: bool = _option(False, "accept an eps that covers the whole image space (e.g. linf eps >= 1)",
                                    hashed=NOT_HASHED, flag=None)
    n_ex: int | None = _option(None, "evaluate the first N test images (default all)", hashed=DERIVED, type=int)
    data: str | Path | None = _option(None, ".npz with x (uint8 NHWC or float NCHW in [0,1]) and y",
                                      hashed=DERIVED)
    data_dir: str | Path | None = _option(None, "where CIFAR is read from or downloaded to (default: in the "
                                                "score-zoo cache)", hashed=NOT_HASHED)
    data_root: str | Path | None = _option(None, "an existing torchvision CIFAR folder (a local copy; checked "
                                                 "against the published md5 sums, never downloaded)",
                                           hashed=DERIVED, metavar="DIR")
    version: str = _option("standard", "AutoAttack version (custom when --attacks is given)", hashed=VALUE,
                           choices=_versions)
    attacks: tuple[str, ...] | None = _option(None, "comma-separated attacks, with --version custom "
                                                    "(apgd-ce,apgd-dlr,apgd-t,fab,fab-t,square)", hashed=VALUE)
    seed: int = _option(0, "attack seed", hashed=VALUE, type=int)
    batch_size: int = _option(DEFAULT_BATCH_SIZE, "AutoAttack batch size B, part of the result's definition (the "
                                                  "reference reseeds per batch); the same default on every device",
                              hashed=VALUE, type=int)
    # Not hashed: the device says where the same configuration runs. A GPU and a CPU (or two GPU models) may
    # round differently, but shards of one run may run, resume and merge on any device; each record names
    # the device it was finished on.
    device: str | None = _option(None, "cpu, cuda or cuda:N (default: cuda when available; under torchrun each "
                                       "rank uses GPU LOCAL_RANK)", hashed=NOT_HASHED)
    precision: str = _option("fp32", "fp32 (exact); tf32 on GPUs; bf16 on GPUs and on CPUs with native bf16 "
                                     "(AMX/AVX512-BF16): bf16 drives the attacks, every flag comes from fp32",
                             hashed=VALUE, choices=_precisions)
    engine: str = _option("reference", "attack implementation", hashed=VALUE, choices=_engines)
    results_dir: str | Path = _option("results", "where records are written", hashed=NOT_HASHED)
    run_dir: str | Path | None = _option(None, "where the resumable state lives (default: in the cache)",
                                         hashed=NOT_HASHED, saved=False)
    checkpoint: str | Path | None = _option(None, "local checkpoint file instead of downloading the weights",
                                            hashed=DERIVED)
    shard: tuple[int, int] | str | None = _option(None, "evaluate only shard I of K (0-based); K is hashed",
                                                  hashed=DERIVED, saved=False, metavar="I/K")
    model_label: str | None = _option(None, "name used in results paths instead of the model name",
                                      hashed=DERIVED)
    chunk_batches: int = _option(DEFAULT_CHUNK_BATCHES, "save progress every N batches", hashed=NOT_HASHED,
                                 saved=False, type=int)
    # Not hashed, like the device whose default it follows (with the precision): a memory layout changes
    # kernels (rounding), not the attacks; recorded in the record's extra.
    channels_last: bool | None = _option(None, "channels_last memory format (default: on GPUs, and for bf16 on a CPU)",
                                         hashed=NOT_HASHED, flag=None)
    torch_compile: str | None = _option(None, "run the attacks' model passes through torch.compile (MODE: "
                                              "default, reduce-overhead = CUDA graphs, max-autotune, "
                                              "max-autotune-no-cudagraphs); checks stay eager", hashed=VALUE,
                                        choices=_compile_modes, metavar="MODE")
    # Not hashed, not saved: how many cores this process uses changes speed only; recorded in the record's extra.
    threads: int | None = _option(None, "intra-op threads of this process (default: the cores available to it "
                                        "divided by the evaluation processes on this machine: torchrun's "
                                        "LOCAL_WORLD_SIZE, or K for --shard I/K outside Slurm)",
                                  hashed=NOT_HASHED, saved=False, type=int)
    progress: bool | None = _option(None, "progress bar / lines (default on)", hashed=NOT_HASHED, saved=False,
                                    flag=None)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: RunOptions | None = None, **overrides: Any) -> RunOptions:
        """``options`` (or the defaults) with ``overrides``; an unknown name is a TypeError, as for a function."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown}; known: {', '.join(cls.names())}")
        return dataclasses.replace(options or cls(), **overrides)

    def invocation(self) -> dict[str, Any]:
        """The saved options (JSON-ready), from which resume and merge rebuild the run."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["saved"]:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else (
                    str(value) if isinstance(value, Path) else value)
        return out

    @classmethod
    def from_invocation(cls, invocation: dict[str, Any], **overrides: Any) -> RunOptions:
        """The options a run folder's saved invocation stands for (plus ``overrides``)."""
        saved = {f.name for f in dataclasses.fields(cls) if f.metadata["saved"]}
        kwargs = {k: v for k, v in invocation.items() if k in saved}
        if "attacks" in kwargs and kwargs["attacks"] is not None:
            kwargs["attacks"] = tuple(kwargs["attacks"])
        return cls.build(**{**kwargs, **overrides})


def hashed_values(options: RunOptions) -> dict[str, Any]:
    """The options the configuration hash takes as they are (resolved values)."""
    return {f.name: (list(v) if isinstance(v := getattr(options, f.name), tuple) else v)
            for f in dataclasses.fields(options) if f.metadata["hashed"] == VALUE}
