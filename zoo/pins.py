"""Trust on first use for checkpoints that checkpoints.yaml does not pin yet.

Until a maintainer pastes a sha256 into checkpoints.yaml, any same-shaped weights a server (or a swapped
cache file) delivers would load. So the first file each source delivers is pinned in the local cache
(``pins.json`` under the score-zoo cache) and a later, different file from that source is refused. Each
fetched file says how far it is trusted (``Fetched.provenance``):

- ``pinned``: its sha256 matched the one in checkpoints.yaml (a released checkpoint);
- ``first-use``: nothing was pinned; it is pinned locally from now on;
- ``local-pin``: nothing is pinned in checkpoints.yaml; it matched the local pin from its first use;
- ``local-release``: a local ``--checkpoint`` file whose sha256 matches a pinned release;
- ``local-unverified``: a local file not verified against any release.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import constants
from .errors import CorruptCheckpointError
from .fileio import atomic_write_text, utc_timestamp

PROVENANCE = ("pinned", "first-use", "local-pin", "local-release", "local-unverified")
#: provenance kinds that identify a released checkpoint (a reproduction of the paper's numbers)
RELEASED = ("pinned", "local-release")


class PinMismatchError(CorruptCheckpointError):
    """A source delivered another file than the one first used here."""


def pins_path() -> Path:
    return constants.cache_dir() / "pins.json"


def key(model: str, dataset: str, threat: str, source: str) -> str:
    return f"{model}/{dataset}/{threat} from {source}"


def _read() -> dict[str, Any]:
    path = pins_path()
    if not path.is_file():
        return {}
    try:
        pins = json.loads(path.read_text(encoding="utf-8"))["pins"]
        if isinstance(pins, dict):
            return pins
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise CorruptCheckpointError(f"the local pin file {path} is unreadable",
                                 hint="delete it: files are pinned again on their next use")


def _write(pins: dict[str, Any]) -> None:
    atomic_write_text(pins_path(), json.dumps({"version": 1, "pins": pins}, indent=2, sort_keys=True) + "\n")


def trust_on_first_use(entry: str, sha256: str, size: int) -> str:
    """``first-use`` (now pinned) or ``local-pin`` (matches); a different file raises CorruptCheckpointError."""
    pins = _read()
    known = pins.get(entry)
    if known is None:
        pins[entry] = {"sha256": sha256, "size": size,
                       "first_use": utc_timestamp()}
        _write(pins)
        return "first-use"
    if known.get("sha256") == sha256:
        return "local-pin"
    raise PinMismatchError(
        f"{entry} delivered a file with sha256 {sha256}, but the file first used here ({known.get('first_use')}) "
        f"had {known.get('sha256')}: the weights changed since",
        hint=f"if the upstream file was replaced on purpose, forget the old pin (`zoo download ... --forget-pins`, "
             f"or delete the entry in {pins_path()}); otherwise check your cache and network")


def forget(entries: list[str]) -> int:
    """Drop local pins; returns how many existed."""
    pins = _read()
    dropped = [e for e in entries if pins.pop(e, None) is not None]
    if dropped:
        _write(pins)
    return len(dropped)


def local_provenance(sha256: str, released: set[str]) -> str:
    return "local-release" if sha256 in released else "local-unverified"
