"""Atomic writes: readers never see half a file, and files get the permissions the umask asks for."""

import os

import pytest

from zoo.fileio import atomic_output, atomic_write_text


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "record.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp file left behind


def test_a_failing_block_publishes_nothing(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("verification failed")
    assert list(tmp_path.iterdir()) == []
