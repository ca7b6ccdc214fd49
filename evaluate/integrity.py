"""Tamper-evidence for result records: a record is checked against its ``.npz`` and against itself.

The writer (``runner._finalize``) seals each record with an ``integrity`` object: the sha256 of the
``<run-id>.npz`` bytes, the full configuration whose hash is ``config_hash`` (checkpoint sha256, data
identity, indices, eps value, seed, batch size, attacks, library versions, ...) and the saved invocation that
rebuilds the run (``zoo-eval verify``). The ``.npz`` also carries the configuration hash.

Every reader (``RunRecord.read``, hence every ``zoo-report`` command, and ``PerExample.read``) calls
:func:`check_record`, which refuses, with a ``RecordError`` naming the file and the mismatch:

- percentages, intervals or ``n_ex`` that disagree with the counts; an eps text that is not the eps value;
- a configuration whose hash is not ``config_hash`` (or not the run id's), or whose fields disagree with
  the record's own (dataset, threat, eps, seed, batch size, attacks, indices, model, checkpoint sha256, data
  sha256, engine, precision, library versions);
- a missing ``.npz``, one whose bytes are not the sealed ones, one of another configuration, or one whose
  flags, indices and stage counts disagree with the JSON;
- adversarial images outside the eps ball of their clean images, where the clean images are at hand: the
  run's ``--data`` file or torchvision CIFAR folder still holding the images whose content hash the record
  gives (a CIFAR test file is unpickled only after its published md5 matched).

Records written before these fields existed are read with a note ("written before integrity fields; not
checked") after the checks that need no seal (counts vs percentages, eps text vs value).

This is not a signature: whoever recomputes every hash after an edit can still forge a consistent record.
``zoo-eval verify RECORD`` goes further and re-runs the model on the stored adversarial and clean images.

numpy only: the report commands must not import torch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo.domain import parse_eps
from zoo.errors import BadInputError, RecordError
from zoo.fileio import file_hexdigest

from .state import config_hash

if TYPE_CHECKING:  # pragma: no cover
    from .record import PerExample, RunRecord

LEGACY_NOTE = "written before integrity fields; not checked"
EPS_TOLERANCE = 1e-6     # relative, as verify.check_adversarial


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(per_example_bytes: bytes, config: dict[str, Any], invocation: dict[str, Any]) -> dict[str, Any]:
    """The record's ``integrity`` object (see the module docstring)."""
    return {"per_example_sha256": sha256_bytes(per_example_bytes), "config": config,
            "invocation": invocation}


def perturbation_norms(delta: np.ndarray, norm: str) -> np.ndarray:
    """Per-example norm of perturbations (any shape with examples first), computed in float64."""
    flat = np.asarray(delta, dtype=np.float64).reshape(len(delta), -1)
    if norm == "Linf":
        return np.abs(flat).max(axis=1, initial=0.0)
    if norm == "L2":
        return np.sqrt((flat ** 2).sum(axis=1))
    if norm == "L1":
        return np.abs(flat).sum(axis=1)
    raise ValueError(f"unknown norm {norm!r}")


def ball_problems(x_adv: np.ndarray, positions: np.ndarray, x_clean: np.ndarray, norm: str, eps: float,
                  tolerance: float = EPS_TOLERANCE) -> list[str]:
    """What is wrong with the stored adversarial images (finite, in [0, 1], within eps of their clean image).

    ``x_clean`` holds every example of the run, in the order of its indices."""
    problems = []
    if x_adv.size and not np.all(np.isfinite(x_adv)):
        bad = positions[~np.isfinite(x_adv.reshape(len(x_adv), -1)).all(axis=1)]
        problems.append(f"{len(bad)} adversarial image(s) contain NaN/inf (positions {bad[:5].tolist()})")
    elif x_adv.size and (x_adv.min() < 0 or x_adv.max() > 1):
        bad = positions[((x_adv < 0) | (x_adv > 1)).reshape(len(x_adv), -1).any(axis=1)]
        problems.append(f"{len(bad)} adversarial image(s) leave [0, 1] (range [{x_adv.min():g}, {x_adv.max():g}], "
                        f"positions {bad[:5].tolist()})")
    if x_adv.size and not problems:
        norms = perturbation_norms(x_adv - np.asarray(x_clean, np.float32)[positions], norm)
        over = norms > eps + tolerance * max(1.0, eps)
        if over.any():
            problems.append(f"{int(over.sum())} adversarial image(s) exceed the {norm} budget {eps:.6g} "
                            f"(largest norm {norms.max():.8g}, positions {positions[over][:5].tolist()})")
    return problems


# ---------------------------------------------------------------- the reader's check


def check_record(path: str | Path, raw: dict[str, Any], record: RunRecord, *,
                 eps_ball: bool = True) -> tuple[list[str], PerExample | None]:
    """Check a record read from ``path`` (``raw``: its JSON) against itself and its ``.npz``.

    Returns notes (a legacy record's "not checked") and the per-example arrays it read and checked (None for
    legacy and corruptions records), so that a caller needing them reads the ``.npz`` once. Raises
    RecordError naming ``path`` and every mismatch found (the ``.npz``'s own problems name the ``.npz``).
    ``eps_ball=False`` leaves the eps-ball check to a caller that has the clean images (``zoo-eval verify``)."""
    origin = str(path)
    problems = _self_problems(raw, record)
    if problems:
        raise RecordError(f"{origin}: record fails its integrity check: " + "; ".join(problems))
    if record.integrity is None:
        return [f"{origin}: {LEGACY_NOTE}"], None
    seal_ = record.integrity
    config = seal_.get("config")
    if not isinstance(config, dict) or not isinstance(seal_.get("per_example_sha256"), str):
        raise RecordError(f"{origin}: record fails its integrity check: malformed integrity object")
    problems = (_corruptions_config_problems if record.kind == "corruptions" else _config_problems)(config, record)
    if problems:
        raise RecordError(f"{origin}: record fails its integrity check: " + "; ".join(problems))
    npz_path = _per_example_file(path, record)
    try:
        data = npz_path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{origin}: its per-example arrays {npz_path} are missing") from None
    except OSError as exc:
        raise RecordError(f"{origin}: cannot read its per-example arrays {npz_path} ({exc})") from None
    digest = sha256_bytes(data)
    if digest != seal_["per_example_sha256"]:
        raise RecordError(f"{origin}: {npz_path.name} is not the file this record was written with (sha256 "
                          f"{digest[:12]}..., the record says {seal_['per_example_sha256'][:12]}...)")
    if record.kind == "corruptions":
        problems = _corruptions_arrays_problems(record, load_arrays(data, str(npz_path)))
        if problems:
            raise RecordError(f"{origin}: record and {npz_path.name} disagree: " + "; ".join(problems))
        return [], None
    from .record import PerExample
    per_example = PerExample.from_bytes(data, str(npz_path))
    problems = _per_example_problems(record, per_example)
    if problems:
        raise RecordError(f"{origin}: record and {npz_path.name} disagree: " + "; ".join(problems))
    if eps_ball:
        x_clean, _why = _clean_images(record)   # not at hand: left to `zoo-eval verify` (no warning per read)
        if x_clean is not None:
            problems = ball_problems(per_example.x_adv, per_example.adv_positions, x_clean, record.norm,
                                     record.eps_value)
            if problems:
                raise RecordError(f"{origin}: {npz_path.name} fails the eps-ball check: " + "; ".join(problems))
    return [], per_example


def read_json(path: Path) -> dict[str, Any]:
    """The raw JSON of a record (RecordError naming ``path`` when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: cannot read result record ({exc})") from None
    except RecursionError:   # e.g. [[[[...]]]] thousands deep: no record is shaped like that
        raise RecordError(f"{path}: cannot read result record (JSON nested too deeply)") from None
    return data


def check_per_example_file(npz_path: str | Path, per_example: PerExample) -> None:
    """What ``PerExample.read`` adds to the ``.npz``'s own checks: the record beside it must accept it."""
    npz_path = Path(npz_path)
    json_path = npz_path.with_suffix(".json")
    if not json_path.exists():
        if per_example.config_hash is not None:   # written by a sealed run: its record must be there
            raise RecordError(f"{npz_path}: its result record {json_path.name} is missing")
        return
    from .record import RunRecord
    try:
        raw = read_json(json_path)
        record = RunRecord.from_dict(raw, origin=str(json_path))
    except BadInputError as exc:
        raise RecordError(f"{npz_path}: its result record is unusable ({exc})") from None
    if record.integrity is None:   # a record older than the seal: nothing to hold the arrays against
        if per_example.config_hash is not None:
            raise RecordError(f"{npz_path}: sealed arrays beside an unsealed record {json_path.name}")
        return
    if record.per_example_file != npz_path.name:
        raise RecordError(f"{npz_path}: {json_path.name} names other per-example arrays "
                          f"({record.per_example_file!r})")
    try:
        check_record(json_path, raw, record)
    except RecordError as exc:
        raise RecordError(f"{npz_path}: {exc}") from None


def _per_example_file(path: str | Path, record: RunRecord) -> Path:
    name = record.per_example_file
    if not name or Path(name).name != name:
        raise RecordError(f"{path}: record fails its integrity check: per_example_file {name!r} is not a file "
                          "name beside the record")
    return Path(path).parent / name


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _self_problems(raw: dict[str, Any], record: RunRecord) -> list[str]:
    problems = []
    accuracies = [("clean", raw.get("clean"), record.clean), ("robust", raw.get("robust"), record.robust)]
    accuracies += [(f"stage {i + 1} ({s.attack})", (raw.get("stages") or [{}] * (i + 1))[i].get("robust"), s.robust)
                   for i, s in enumerate(record.stages)]
    for name, stored, acc in accuracies:
        if not isinstance(stored, dict):
            continue
        if "percent" in stored and not (isinstance(stored["percent"], (int, float))
                                        and _close(float(stored["percent"]), acc.percent)):
            problems.append(f"{name} accuracy says {stored['percent']!r}% but {acc.correct}/{acc.total} is "
                            f"{acc.percent}%")
        interval = acc.interval
        if stored.get("interval95") is not None and (interval is None or stored["interval95"] != list(interval)):
            problems.append(f"{name} interval {stored['interval95']!r} is not the 95% interval of "
                            f"{acc.correct}/{acc.total} ({list(interval) if interval else None})")
    if "n_ex" in raw and raw["n_ex"] != record.n_ex:
        problems.append(f"n_ex {raw['n_ex']!r} differs from the {record.n_ex} indices")
    if record.kind == "corruptions":   # no eps: a corruptions record's budget is the corrupted sets
        return problems
    try:
        value = parse_eps(record.eps)
    except ValueError:
        problems.append(f"eps {record.eps!r} is not a number or a fraction")
    else:
        if not _close(value, float(record.eps_value)):
            problems.append(f"eps {record.eps!r} is {value:.10g} but eps_value is {record.eps_value!r}")
    return problems


def _config_problems(config: dict[str, Any], record: RunRecord) -> list[str]:
    problems = _hash_problems(config, record)
    ckpt = record.checkpoint
    engine_name, _, engine_version = record.engine.partition(" ")
    libs = record.libraries
    expected = {
        "dataset": record.dataset, "threat": record.threat, "norm": record.norm, "eps": record.eps_value,
        "seed": record.seed, "batch_size": record.batch_size, "version": record.version,
        "precision": record.precision, "attacks": list(record.attacks), "indices": list(record.indices),
        "model": record.model, "checkpoint_sha256": ckpt.get("sha256") or ckpt.get("weights_sha256"),
        "weights_sha256": ckpt.get("weights_sha256"),
        "data_sha256": record.data.get("content_sha256"), "engine": engine_name, "engine_version": engine_version,
        "torch": libs.get("torch"), "pyautoattack": libs.get("pyautoattack"), "score_zoo": libs.get("score-zoo"),
    }
    for key, value in expected.items():
        if key not in config:
            problems.append(f"the stored configuration lacks {key!r}")
        elif config[key] != value and not (key == "eps" and isinstance(config[key], (int, float))
                                          and _close(float(config[key]), float(value))):
            problems.append(f"{key} differs from the stored configuration ({_short(value)} vs {_short(config[key])})")
    return problems


def _hash_problems(config: dict[str, Any], record: RunRecord) -> list[str]:
    problems = []
    digest = config_hash(config)
    if digest != record.config_hash:
        problems.append(f"config_hash {record.config_hash[:16]}... is not the hash of the stored configuration "
                        f"({digest[:16]}...)")
    if not record.run_id.endswith(record.config_hash[:8]):
        problems.append(f"run id {record.run_id!r} does not end with the configuration hash's first 8 digits "
                        f"({record.config_hash[:8]})")
    return problems


def _corruptions_config_problems(config: dict[str, Any], record: RunRecord) -> list[str]:
    """A corruptions run's configuration (evaluate/corruptions.py) against the record's own fields."""
    problems = _hash_problems(config, record)
    ckpt = record.checkpoint
    expected = {"kind": "corruptions", "dataset": record.dataset, "model": record.model, "n": record.n_ex,
                "checkpoint_sha256": ckpt.get("sha256") or ckpt.get("weights_sha256"),
                "clean_sha256": record.data.get("content_sha256"),
                "corruptions_sha256": record.data.get("corruptions_sha256"), "batch_size": record.batch_size}
    for key, value in expected.items():
        if config.get(key) != value:
            problems.append(f"{key} differs from the stored configuration ({_short(value)} vs "
                            f"{_short(config.get(key))})")
    return problems


def _corruptions_arrays_problems(record: RunRecord, arrays: dict[str, np.ndarray]) -> list[str]:
    """The per-set counts and clean flags of a corruptions record against its .npz."""
    try:
        correct, clean = arrays["correct"], arrays["clean_correct"]
        names = [str(c) for c in arrays["corruptions"]]
    except KeyError as exc:
        return [f"the arrays lack {exc.args[0]!r}"]
    problems = []
    if str(arrays.get("config_hash", "")) != record.config_hash:
        problems.append("the arrays belong to another configuration")
    if names != list(record.corruptions or {}):
        problems.append("the corruptions differ")
    elif correct.shape != (len(names), 5, record.n_ex):
        problems.append(f"correct has shape {correct.shape}")
    else:
        for ci, name in enumerate(names):
            counts = [int(v) for v in correct[ci].sum(axis=1)]
            if counts != [a.correct for a in record.corruptions[name]]:
                problems.append(f"{name}: {counts} correct per severity, the record says "
                                f"{[a.correct for a in record.corruptions[name]]}")
    if int(np.asarray(clean).sum()) != record.clean.correct:
        problems.append(f"{int(np.asarray(clean).sum())} clean-correct in the arrays, {record.clean.correct} in the "
                        "record")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _per_example_problems(record: RunRecord, pe: PerExample) -> list[str]:
    problems = []
    if pe.config_hash != record.config_hash:
        problems.append(f"the arrays belong to configuration {str(pe.config_hash)[:16]}..., the record to "
                        f"{record.config_hash[:16]}...")
    if not np.array_equal(pe.indices, np.asarray(record.indices, dtype=np.int64)):
        problems.append("example indices differ")
        return problems
    clean = int(pe.clean_correct.sum())
    if clean != record.clean.correct:
        problems.append(f"clean count {record.clean.correct} in the record, {clean} in the arrays")
    robust = int(pe.robust.sum())
    if robust != record.robust.correct:
        problems.append(f"robust count {record.robust.correct} in the record, {robust} in the arrays")
    if len(pe.broken_by) and pe.broken_by.max() >= max(len(record.attacks), 1):
        problems.append("broken_by names an attack the record does not list")
    for s, stage in enumerate(record.stages):
        count = int(pe.robust_after(s).sum())
        if count != stage.robust.correct:
            problems.append(f"robust count after {stage.attack} {stage.robust.correct} in the record, {count} in "
                            "the arrays")
    return problems


#: The CIFAR test files torchvision reads, with their published md5 (checked before unpickling one).
CIFAR_TEST_FILES = {"cifar10": ("test_batch", "40351d587109b95175f43aff81a1287e", "labels"),
                    "cifar100": ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc", "fine_labels")}


def content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    """The data identity the configuration holds (``data._finish`` computes it with this): float32 NCHW images
    and int64 labels."""
    digest = hashlib.sha256()
    digest.update(str(tuple(int(d) for d in x.shape)).encode())
    digest.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _clean_images(record: RunRecord) -> tuple[np.ndarray | None, str]:
    """The run's clean images (float32 NCHW in [0, 1], in the order of its indices) re-read from its data
    source, or None and why not. They count only when their content hash is the recorded one. numpy only: a
    ``--data`` file, or the test file of a torchvision CIFAR folder (unpickled only after its published md5
    matched, as torchvision does). A report reads many records of one data set: the verified images are
    kept for the next record while the file is unchanged (same inode, size and modification time)."""
    source, path = record.data.get("source"), Path(str(record.data.get("path")))
    n, digest = record.data.get("n"), record.data.get("content_sha256")
    if not isinstance(n, int) or n < len(record.indices) or not digest:
        return None, "the record does not identify its data"
    if source not in ("file", "torchvision"):
        return None, f"unknown data source {source!r}"
    spec = CIFAR_TEST_FILES.get(record.dataset) if source == "torchvision" else None
    read = path / spec[0] if spec else path
    try:
        st = read.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    x, why = _verified_images(source, str(path), record.dataset, spec, n, str(digest), stamp)
    if x is None:
        return None, why
    return x[np.asarray(record.indices, dtype=np.int64)], ""


@functools.lru_cache(maxsize=2)
def _verified_images(source: str, path_text: str, dataset: str, spec: tuple[str, str, str] | None, n: int,
                     digest: str, stamp: tuple[int, int, int] | None) -> tuple[np.ndarray | None, str]:
    """The first n images of a data source whose content hash is ``digest`` (read-only), or None and why not;
    ``spec``: the torchvision test file's (name, md5, label key); ``stamp`` is only part of the cache key."""
    path = Path(path_text)
    if source == "file":
        if not path.is_file():
            return None, f"the data file {path} is missing"
        try:
            with np.load(path, allow_pickle=False) as npz:
                x, y = npz["x"][:n], npz["y"][:n]
        except (OSError, ValueError, KeyError) as exc:
            return None, f"cannot read {path} ({exc})"
        if x.dtype == np.uint8 and x.ndim == 4:            # NHWC 0-255, as zoo-eval reads it
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    elif spec is not None:
        name, md5, label_key = spec
        test_file = path / name
        if not test_file.is_file():
            return None, f"{test_file} is missing"
        if file_hexdigest(test_file, "md5") != md5:
            return None, f"{test_file} is not the published {dataset} test file (md5 differs)"
        import pickle   # the published file (md5 above), which torchvision unpickles the same way

        try:
            with open(test_file, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)[:n]
            y = np.asarray(batch[label_key], dtype=np.int64)[:n]
        except Exception as exc:  # noqa: BLE001 -- any unreadable file means "not available"
            return None, f"cannot read {test_file} ({type(exc).__name__})"
        x = x.astype(np.float32) / np.float32(255)
    else:
        return None, f"unknown data source {source!r}"
    if len(x) < n or len(y) < n or content_sha256(x, y) != digest:
        return None, f"{path} no longer holds the images the run read (content sha256 differs)"
    x = np.ascontiguousarray(x, dtype=np.float32)
    x.setflags(write=False)
    return x, ""


def load_arrays(data: bytes, origin: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise RecordError(f"{origin}: cannot read per-example arrays ({exc})") from None
