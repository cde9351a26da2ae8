"""Lanczos on explicit symmetric matrices with known spectra (torch.linalg.eigvalsh)."""

from __future__ import annotations

import pytest
import torch

from stablestep.curvature import LanczosConfig, lanczos_top


def _matrix(n, top=(10.0, 7.0, 5.0), seed=0, negative=0.0):
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(n - len(top), dtype=torch.float64, generator=g) * 0.3
    ev = torch.cat([torch.tensor(top, dtype=torch.float64), bulk])
    if negative:
        ev[-1] = negative
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q @ torch.diag(ev) @ q.T


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-6])
def test_top_eigenvalue_within_tol(tol):
    a = _matrix(300)
    exact = torch.linalg.eigvalsh(a)[-1].item()
    res = lanczos_top(lambda x: a @ x, 300, config=LanczosConfig(tol=tol))
    assert res.converged and abs(res.top - exact) <= tol * exact


def test_largest_algebraic_not_largest_magnitude():
    """Power iteration would return -30 here; stability needs the top positive one."""
    a = _matrix(200, negative=-30.0)
    res = lanczos_top(lambda x: a @ x, 200, config=LanczosConfig(tol=1e-6))
    assert res.top == pytest.approx(10.0, rel=1e-6)


def test_top_k_and_vectors():
    a = _matrix(200)
    evals, evecs = torch.linalg.eigh(a)
    res = lanczos_top(lambda x: a @ x, 200, config=LanczosConfig(tol=1e-8, k=3))
    assert res.eigenvalues == pytest.approx([10.0, 7.0, 5.0], rel=1e-7)
    for i in range(3):
        assert abs(float(res.vectors[i] @ evecs[:, -1 - i])) > 1 - 1e-6


def test_warm_start_needs_fewer_products():
    a = _matrix(300)
    cold = lanczos_top(lambda x: a @ x, 300, config=LanczosConfig(tol=1e-3))
    b = a + 0.01 * _matrix(300, seed=1)  # a slightly different operator
    again = lanczos_top(lambda x: b @ x, 300, config=LanczosConfig(tol=1e-3),
                        v0=cold.vectors[0])
    fresh = lanczos_top(lambda x: b @ x, 300, config=LanczosConfig(tol=1e-3, seed=1))
    assert again.n_matvec < fresh.n_matvec
    assert again.top == pytest.approx(torch.linalg.eigvalsh(b)[-1].item(), rel=1e-3)


def test_small_operator_is_exact_and_v0_checked():
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    res = lanczos_top(lambda x: a @ x, 3, config=LanczosConfig(tol=1e-12))
    assert res.top == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="v0 has 2 entries, expected 3"):
        lanczos_top(lambda x: a @ x, 3, v0=torch.ones(2))
    with pytest.raises(ValueError, match=r"Invalid k: 0 \(expected >= 1\)"):
        LanczosConfig(k=0)
