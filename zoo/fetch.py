"""Getting checkpoint files: Hub first, then the fallbacks, verified and cached.  (WORK IN PROGRESS)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .fileio import sha256_file
from .registry import ModelInfo, Variant


@dataclass(frozen=True)
class Fetched:
    """A checkpoint file on local disk and where it came from (recorded in evaluation results)."""

    path: Path
    source: str
    sha256: str
    size: int


def fetch_local(path: str | Path) -> Fetched:
    """A user-supplied checkpoint file: hashed for the record, never copied."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"checkpoint file {path} does not exist",
                            hint="pass the path of a downloaded .pt/.pth/.safetensors file")
    return Fetched(path=path.resolve(), source="local file", sha256=sha256_file(path), size=path.stat().st_size)


def fetch(model: ModelInfo, variant: Variant, revision: str | None = None, progress: bool = True) -> Fetched:
    raise NotImplementedError
