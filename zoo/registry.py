"""checkpoints.yaml as typed, validated data: the registry every other module reads.

The YAML file at the repo root is the single source of truth; it ships inside the wheel as
``zoo/checkpoints.yaml``. Validation is strict (required keys, types, no unknown keys) so a typo in the
file fails the schema test instead of silently dropping a field.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import constants
from .domain import DATASETS, NORM_THREATS as THREATS, parse_eps
from .errors import RegistryError, UnknownModelError, UnknownVariantError

SOURCE_KINDS = ("hub", "url", "gdrive")


@dataclass(frozen=True)
class Source:
    """One place the weights can come from. ``kind`` picks which of the other fields matter."""

    kind: str
    sha256: str | None = None
    size: int | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    url: str | None = None
    file_id: str | None = None

    @property
    def resolved_repo_id(self) -> str | None:
        return None if self.repo_id is None else self.repo_id.replace("{org}", constants.hub_org())

    def describe(self) -> str:
        if self.kind == "hub":
            return f"Hugging Face Hub {self.resolved_repo_id}/{self.filename}@{self.revision or 'main'}"
        if self.kind == "url":
            return f"URL {self.url}"
        return f"Google Drive file {self.file_id}"


@dataclass(frozen=True)
class Architecture:
    name: str
    label: str
    depth: int
    width: int
    activation: str


@dataclass(frozen=True)
class Paper:
    title: str
    authors: tuple[str, ...]
    venue: str
    link: str
    code: str | None = None


@dataclass(frozen=True)
class RobustBenchStrings:
    """How RobustBench itself spells this paper in its model_info files (kept exactly, quirks included:
    its SCORE name starts with a space and links the arXiv PDF), so our model_info files match its own."""

    name: str
    link: str
    venue: str | None = None   # None: the paper's venue


@dataclass(frozen=True)
class Variant:
    """One released checkpoint: a model trained on one dataset against one threat."""

    dataset: str
    threat: str
    eps: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reported: dict[str, float]
    sources: tuple[Source, ...]

    @property
    def eps_value(self) -> float:
        return parse_eps(self.eps)


@dataclass(frozen=True)
class ModelInfo:
    """Everything the registry knows about one network (``zoo.info`` returns this)."""

    name: str
    robustbench_id: str
    paper: Paper
    architecture: Architecture
    additional_data: bool
    footnote: str | None
    variants: tuple[Variant, ...] = field(default_factory=tuple)
    robustbench: RobustBenchStrings | None = None   # None: RobustBench spells it as our paper block does

    def variant(self, dataset: str = "cifar10", threat: str = "linf") -> Variant:
        for v in self.variants:
            if v.dataset == dataset and v.threat == threat:
                return v
        have = ", ".join(f"dataset={v.dataset!r} threat={v.threat!r}" for v in self.variants)
        raise UnknownVariantError(
            f"{self.name} has no checkpoint for dataset={dataset!r}, threat={threat!r}",
            hint=f"available: {have}",
        )


# ---------------------------------------------------------------- schema validation

_SCHEMA = {
    "model": {"robustbench_id": str, "robustbench": dict, "paper": dict, "training": dict, "architecture": dict,
              "variants": list},
    "paper": {"title": str, "authors": list, "venue": str, "link": str, "code": (str, type(None))},
    "training": {"additional_data": bool, "footnote": (str, type(None))},
    "architecture": {"name": str, "label": str, "depth": int, "width": int, "activation": str},
    "variant": {"dataset": str, "threat": str, "eps": str, "num_classes": int, "mean": list, "std": list,
                "reported": dict, "sources": list},
    "reported": {"clean_acc": (int, float), "autoattack_acc": (int, float)},
    "robustbench": {"name": str, "link": str, "venue": str},
}
_OPTIONAL = {"paper": {"code"}, "model": {"robustbench"}, "robustbench": {"venue"}}
_SOURCE_FIELDS = {
    "hub": {"repo_id": str, "filename": str, "revision": (str, type(None))},
    "url": {"url": str},
    "gdrive": {"file_id": str},
}
_SOURCE_COMMON = {"kind": str, "sha256": (str, type(None)), "size": (int, type(None))}


def _check_keys(where: str, data: Any, spec: dict[str, Any], optional: set[str] = frozenset()) -> None:
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - set(spec)
    missing = set(spec) - set(data) - set(optional)
    if unknown:
        raise RegistryError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(spec)}")
    if missing:
        raise RegistryError(f"{where}: missing key(s) {sorted(missing)}")
    for key, typ in spec.items():
        if key in data and (not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool))):
            raise RegistryError(f"{where}.{key}: expected {typ}, got {data[key]!r}")


def _parse_source(where: str, raw: Any) -> Source:
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in SOURCE_KINDS:
        raise RegistryError(f"{where}.kind: expected one of {SOURCE_KINDS}, got {kind!r}")
    _check_keys(where, raw, {**_SOURCE_COMMON, **_SOURCE_FIELDS[kind]})
    sha = raw["sha256"]
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise RegistryError(f"{where}.sha256: expected 64 lowercase hex digits or null, got {sha!r}")
    if raw["size"] is not None and raw["size"] <= 0:
        raise RegistryError(f"{where}.size: must be positive or null")
    return Source(**raw)


def _parse_variant(where: str, raw: Any) -> Variant:
    _check_keys(where, raw, _SCHEMA["variant"])
    if raw["dataset"] not in DATASETS:
        raise RegistryError(f"{where}.dataset: expected one of {DATASETS}, got {raw['dataset']!r}")
    if raw["threat"] not in THREATS:
        raise RegistryError(f"{where}.threat: expected one of {THREATS}, got {raw['threat']!r}")
    try:
        eps = parse_eps(raw["eps"])
    except ValueError as exc:
        raise RegistryError(f"{where}.eps: {exc}") from None
    if eps <= 0:
        raise RegistryError(f"{where}.eps: must be positive")
    for key in ("mean", "std"):
        vals = raw[key]
        if len(vals) != 3 or not all(isinstance(v, (int, float)) for v in vals):
            raise RegistryError(f"{where}.{key}: expected 3 numbers, got {vals!r}")
    _check_keys(f"{where}.reported", raw["reported"], _SCHEMA["reported"])
    if not raw["sources"]:
        raise RegistryError(f"{where}.sources: at least one source is required")
    sources = tuple(_parse_source(f"{where}.sources[{i}]", s) for i, s in enumerate(raw["sources"]))
    return Variant(
        dataset=raw["dataset"], threat=raw["threat"], eps=raw["eps"], num_classes=raw["num_classes"],
        mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
        reported={k: float(v) for k, v in raw["reported"].items()}, sources=sources,
    )


def parse_registry(data: Any) -> dict[str, ModelInfo]:
    """Validate the loaded YAML document and build the typed registry. Raises RegistryError."""
    _check_keys("checkpoints.yaml", data, {"schema_version": int, "models": dict})
    if data["schema_version"] != 1:
        raise RegistryError(f"checkpoints.yaml: unsupported schema_version {data['schema_version']}")
    models = {}
    for name, raw in data["models"].items():
        where = f"models.{name}"
        _check_keys(where, raw, _SCHEMA["model"], _OPTIONAL["model"])
        robustbench = None
        if "robustbench" in raw:
            _check_keys(f"{where}.robustbench", raw["robustbench"], _SCHEMA["robustbench"], _OPTIONAL["robustbench"])
            robustbench = RobustBenchStrings(**raw["robustbench"])
        _check_keys(f"{where}.paper", raw["paper"], _SCHEMA["paper"], _OPTIONAL["paper"])
        _check_keys(f"{where}.training", raw["training"], _SCHEMA["training"])
        _check_keys(f"{where}.architecture", raw["architecture"], _SCHEMA["architecture"])
        variants = tuple(_parse_variant(f"{where}.variants[{i}]", v) for i, v in enumerate(raw["variants"]))
        keys = [(v.dataset, v.threat) for v in variants]
        if len(set(keys)) != len(keys):
            raise RegistryError(f"{where}.variants: duplicate (dataset, threat) pairs")
        paper = dict(raw["paper"])
        paper["authors"] = tuple(paper["authors"])
        models[name] = ModelInfo(
            name=name, robustbench_id=raw["robustbench_id"], paper=Paper(**paper),
            architecture=Architecture(**raw["architecture"]),
            additional_data=raw["training"]["additional_data"], footnote=raw["training"]["footnote"],
            variants=variants, robustbench=robustbench,
        )
    return models


def registry_path() -> Path:
    """The registry file shipped in the package (a link to the repo-root file in a checkout).

    ``$SCORE_ZOO_REGISTRY`` replaces it (a lab's private registry, tests)."""
    override = constants.registry_override()
    if override is not None:
        return override
    return Path(str(resources.files("zoo").joinpath("checkpoints.yaml")))


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[str, ModelInfo]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:   # its text names the line and column
        raise RegistryError(f"{path} is not valid YAML: {' '.join(str(exc).split())}",
                            hint=f"fix the file, or unset {constants.REGISTRY_ENV} to use the packaged registry"
                            ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read the registry {path} ({exc})",
                            hint=f"fix the path, or unset {constants.REGISTRY_ENV}") from None
    return parse_registry(data)


def load_registry(path: str | Path | None = None) -> dict[str, ModelInfo]:
    return _load(str(path or registry_path()))


def resolve_name(name: str) -> str:
    """Registry name for ``name``, accepting RobustBench ids as aliases (case-insensitive)."""
    models = load_registry()
    if name in models:
        return name
    for key, info in models.items():
        if name.lower() in (key.lower(), info.robustbench_id.lower()):
            return key
    candidates = list(models) + [m.robustbench_id for m in models.values()]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(models)}"
    raise UnknownModelError(f"unknown model {name!r}", hint=hint + " (`zoo ls` lists them all)")


def info(name: str) -> ModelInfo:
    return load_registry()[resolve_name(name)]


def list_models(pattern: str = "*", dataset: str | None = None, threat: str | None = None) -> list[str]:
    """Registry names matching a shell-style wildcard and, optionally, a dataset and threat."""
    out = []
    for name, model in load_registry().items():
        if not (fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(model.robustbench_id, pattern)):
            continue
        if any((dataset is None or v.dataset == dataset) and (threat is None or v.threat == threat)
               for v in model.variants):
            out.append(name)
    return sorted(out)
