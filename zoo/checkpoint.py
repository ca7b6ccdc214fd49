"""Reading checkpoint files safely and loading them strictly into a network.

Accepted layouts:
- the authors' SCORE files: ``{'model_state_dict': ..., 'unaveraged_model_state_dict': ...}`` with keys
  prefixed ``module.0.`` — ``model_state_dict`` holds the weight-averaged (EMA) model, the one to use;
- RobustBench's re-saved files: ``{'state_dict': ...}`` or a bare state dict, optional ``module.`` prefix;
- ``model.safetensors`` (what ``zoo publish`` uploads).
Pickles are read with ``torch.load(weights_only=True)``: a downloaded file can never run code.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .errors import ArchitectureMismatchError, CorruptCheckpointError

STATE_DICT_KEYS = ("model_state_dict", "state_dict")  # in priority order
PREFIXES = ("module.0.", "module.", "model.")

_HTML_MARKERS = (b"<!doctype", b"<html", b"<head", b"<?xml", b"<body")
_PICKLE_PROTOCOL_MARK = 0x80


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip' or 'torch-pickle' from the file's first bytes, else CorruptCheckpointError.

    Catches the classic failure of Drive/CDN downloads — an HTML page saved under a .pt name — and empty
    or truncated files before anything tries to unpickle them.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
    stripped = head.lstrip().lower()
    if any(stripped.startswith(m) for m in _HTML_MARKERS):
        raise CorruptCheckpointError(
            f"{path} is an HTML page, not a checkpoint (a login, quota or virus-scan page was saved)",
            hint="delete it and download again, or pass checkpoint=PATH to a file you fetched in a browser")
    if size < 16:
        raise CorruptCheckpointError(f"{path} is empty or truncated ({size} bytes)",
                                     hint="delete it and download again")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CorruptCheckpointError(f"{path} is a truncated or damaged torch file ({exc})",
                                         hint="delete it and download again") from None
        if bad is not None:
            raise CorruptCheckpointError(f"{path} is damaged (CRC error in {bad})",
                                         hint="delete it and download again")
        return "torch-zip"
    if head[0] == _PICKLE_PROTOCOL_MARK:
        return "torch-pickle"
    if head[8:9] == b"{" and _is_safetensors_header(path, size):
        return "safetensors"
    raise CorruptCheckpointError(f"{path} is not a PyTorch or safetensors checkpoint (unrecognised header)",
                                 hint="delete it and download again, or check the file you passed")


def _is_safetensors_header(path: Path, size: int) -> bool:
    """safetensors = 8-byte little-endian header length, then that many bytes of JSON."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if 8 + header_len > size:
            return False
        try:
            json.loads(fh.read(header_len))
        except ValueError:
            return False
    return True


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in ``path``, prefixes removed, whatever the upstream layout."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({exc})",
                                         hint="delete it and download again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError/EOFError for truncation
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CorruptCheckpointError(
                f"{path} contains pickled code or objects, which score-zoo refuses to load "
                f"(torch.load(weights_only=True) said: {str(exc).splitlines()[0]})",
                hint="only load checkpoints from sources you trust; convert it with `zoo publish` on a "
                     "machine where you have inspected it") from None
        raise CorruptCheckpointError(f"{path} could not be read as a torch checkpoint ({exc})",
                                     hint="delete it and download again") from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: object, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(
            f"{origin} holds no state dict (expected tensors, or a dict with one of {STATE_DICT_KEYS})")
    return strip_prefix(obj)


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (DataParallel ``module.``, the authors' ``module.0.``) shared by all keys."""
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str = "checkpoint") -> nn.Module:
    """Strict load that names every missing, unexpected or wrongly shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s): {_abbrev(keys)}")
        if reshaped:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped]
            parts.append(f"{len(reshaped)} key(s) of the wrong shape: {_abbrev(shapes)}")
        raise ArchitectureMismatchError(
            f"{origin} does not fit {type(model).__name__}: " + "; ".join(parts),
            hint="check that the checkpoint is for this model, dataset (num_classes) and depth/width")
    model.load_state_dict(state, strict=True)
    return model


def _abbrev(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
