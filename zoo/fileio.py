"""Atomic writes and hashing: no reader ever sees half a file, whatever is killed when."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def utc_timestamp() -> str:
    """Now in UTC, ISO 8601 to the second: the one format of every time written into a file."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` when the block succeeds, else delete it.

    The block may verify the temp file before it is published (fetch does): raising discards it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the owner (pid@host) is in the name so a later clean-up can tell a live writer's file from an orphan
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{temp_owner()}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and caches are often shared by a group
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_owner() -> str:
    """``pid@host`` of this process, as written into temp file names (host without dots or odd characters)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
    return f"{os.getpid()}@{host}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same folder, fsync, then rename over ``path``."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_hexdigest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """The hex digest of a file read in chunks (checkpoints and archives run to gigabytes); ``algorithm`` is
    a hashlib name: sha256 for what we pin, md5 where a publisher gives only that (CIFAR, Zenodo)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_hexdigest(path, "sha256")


# ---------------------------------------------------------------- orphaned temp files

_TEMP_NAME = re.compile(r"^\..+\.tmp$")
_TEMP_OWNER = re.compile(r"\.(\d+)@([A-Za-z0-9_-]+)\.[^.]+\.tmp$")
STALE_TEMP_SECONDS = 3600.0


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:   # e.g. EPERM: it exists, under another user
        return False
    return False


def stale_temp_files(folder: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """The ``.<name>.*.tmp`` files ``atomic_output`` left in ``folder`` (not recursive) that no writer owns:
    written by a process of this host that is gone, or, when the owner cannot be checked (another host, an
    older name without the owner), not touched for ``max_age`` seconds. A live writer's file on this host is
    never stale, however old."""
    folder = Path(folder)
    try:
        candidates = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    except OSError:
        return []
    _, host = temp_owner().split("@", 1)
    now = time.time()
    stale = []
    for p in candidates:
        owner = _TEMP_OWNER.search(p.name)
        if owner and owner.group(2) == host:
            if _process_gone(int(owner.group(1))):
                stale.append(p)
            continue
        try:
            if now - p.stat().st_mtime > max_age:
                stale.append(p)
        except OSError:   # removed meanwhile
            continue
    return stale


def remove_stale_temp_files(folder: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete ``stale_temp_files(folder)``; returns what was removed (errors skip a file, never raise)."""
    removed = []
    for p in stale_temp_files(folder, max_age):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed
