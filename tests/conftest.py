"""Fixtures shared by every test module."""

import pytest

import eval_helpers as h


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models on 2 shared cores: a second intra-op thread only adds contention."""
    with h.one_thread():
        yield


@pytest.fixture
def synthetic_data_file(tmp_path):
    """8 synthetic images with labels, saved as a zoo-eval ``--data`` file."""
    x, y = h.synthetic_images(8, seed=2)
    return h.write_npz(tmp_path / "d.npz", x, y)
