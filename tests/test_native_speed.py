"""The native engine's CPU speed-ups change no result: same permutations, same adversarial images."""

from __future__ import annotations

import pytest
import torch

from zoo.evaluate.attacks.native.fab import _argsort_nonnegative, project_linf


def _tied_rows(seed: int, rows: int = 24, cols: int = 3072) -> torch.Tensor:
    """What the Linf projection sorts: a - t * (2a - 1) for images on the 1/255 grid, nudged in places."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (rows, cols), generator=g).float() / 255
    t = (t + (torch.rand(rows, cols, generator=g) < 0.3) * 0.0007).clamp(0, 1)
    a = (torch.rand(rows, cols, generator=g) < 0.5).float()
    return a - t * (2 * a - 1)


@pytest.mark.parametrize("seed", range(4))
def test_int_view_argsort_is_torch_argsort_on_tied_rows(seed):
    p = _tied_rows(seed)
    assert (p[:, 1:] == p[:, :-1]).any() or (p.sort(1)[0].diff(dim=1) == 0).any()   # ties are there
    assert torch.equal(_argsort_nonnegative(p), torch.argsort(p, dim=1))


def test_int_view_argsort_falls_back_where_bits_do_not_order_like_values():
    p = _tied_rows(7, rows=4, cols=64)
    for bad in (-0.0, -0.5, float("nan")):
        q = p.clone()
        q[1, 5] = bad
        q[2, 9] = bad
        assert torch.equal(_argsort_nonnegative(q), torch.argsort(q, dim=1))


def test_projection_unchanged_on_grid_images():
    """project_linf with the int-view argsort against the same arithmetic with torch.argsort, bit for bit."""
    import zoo.evaluate.attacks.native.fab as fab

    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 256, (16, 3072), generator=g).float() / 255
    w = torch.randn(16, 3072, generator=g)
    w[:, :40] = 0.0
    b = (w * torch.rand(16, 3072, generator=g)).sum(1)
    got = project_linf(t, w, b)
    original = fab._argsort_nonnegative
    try:
        fab._argsort_nonnegative = lambda p: torch.argsort(p, dim=1)
        want = project_linf(t, w, b)
    finally:
        fab._argsort_nonnegative = original
    assert torch.equal(got, want)
