"""One process per run folder (per shard of it): an ``fcntl.flock`` held while a process works on the run.

Two processes resuming the same run folder would overwrite each other's state and both write the record;
the second one stops at once instead, naming the folder and the process holding it. The lock is on a file
``.lock-shard-III-of-KKK`` in the run folder, so the shards of a split run side by side. The kernel drops the
lock when its process ends, however it ends: a lock file left behind by a killed run locks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from zoo.errors import RunStateError
from zoo.fileio import temp_owner

from .state import shard_file_name

try:
    import fcntl
except ImportError:   # not on Windows: no locking there
    fcntl = None


def lock_path(run_dir: str | Path, shard: tuple[int, int]) -> Path:
    return Path(run_dir) / (".lock-" + shard_file_name(*shard).removesuffix(".npz"))


@contextlib.contextmanager
def holding(run_dir: str | Path, shard: tuple[int, int] = (0, 1)) -> Iterator[None]:
    """Hold the lock of ``shard`` of ``run_dir`` for the block; RunStateError at once if another process has it."""
    if fcntl is None:
        yield
        return
    path = lock_path(run_dir, shard)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = _read_owner(fd) or "another process"
            i, k = shard
            where = "" if k == 1 else f" (shard {i}/{k})"
            raise RunStateError(
                f"run folder {Path(run_dir)}{where} is in use by process {owner}; refusing to work on it twice",
                hint="wait for that run to finish (or stop it), then re-run to resume; to evaluate anew at the same "
                     "time, pass another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{temp_owner()}\n".encode())
        yield
    finally:
        os.close(fd)   # releases the lock


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""
