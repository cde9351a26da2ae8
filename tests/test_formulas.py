"""stablestep.formulas against independent references.

The effective step against torch.optim.Adam's actual update (both epsilon conventions) and
the Keras/TF ``lr_t``/``eps_hat`` algebra; the stability bounds against the spectral radius
of torch's own iteration on a 1-D quadratic; the secant curvature against the exact
eigenvalues of a quadratic; StableAdamW's ratio against the paper's algorithm written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablestep import formulas as F


@pytest.fixture(autouse=True)
def _float64():
    """float64 throughout this module only (the default dtype is process-global)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---------------------------------------------------------------- effective step, eps_t


def _torch_adam_steps(eps: float, n_steps: int, *, tf_eps_hat: float | None = None):
    """Run torch.optim.Adam (float64) and yield (t, delta, m, v) after each step.

    With ``tf_eps_hat`` the group's eps is set each step to the torch-convention value of a
    TF-convention eps_hat, computed here from Keras' own algebra, not from formulas.
    """
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, generator=gen))
    opt = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.99), eps=eps, foreach=False)
    for t in range(1, n_steps + 1):
        if tf_eps_hat is not None:
            opt.param_groups[0]["eps"] = tf_eps_hat / math.sqrt(1 - 0.99**t)
        p.grad = torch.randn(64, generator=gen) * (10.0 ** (-t))  # v spans the eps scale
        before = p.detach().clone()
        opt.step()
        st = opt.state[p]
        yield t, p.detach() - before, st["exp_avg"].clone(), st["exp_avg_sq"].clone()


def test_effective_step_is_torch_adams_update_torch_convention():
    for t, delta, m, v in _torch_adam_steps(1e-4, 6):
        d = F.effective_step(v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-4, step=t)
        torch.testing.assert_close(-d * m, delta, rtol=1e-12, atol=1e-15)


def test_effective_step_tf_convention_is_keras_algebra_and_torch_with_eps_t():
    eps_hat = 1e-4
    for t, delta, m, v in _torch_adam_steps(0.0, 6, tf_eps_hat=eps_hat):
        d = F.effective_step(v, lr=1e-2, beta1=0.9, beta2=0.99, eps=eps_hat, step=t,
                             eps_mode="tf")
        torch.testing.assert_close(-d * m, delta, rtol=1e-12, atol=1e-15)
        # Keras / TF1: lr_t = lr*sqrt(1-b2^t)/(1-b1^t); step = lr_t * m / (sqrt(v) + eps_hat)
        mn, vn = m.numpy(), v.numpy()
        lr_t = 1e-2 * np.sqrt(1 - 0.99**t) / (1 - 0.9**t)
        np.testing.assert_allclose(d.numpy() * mn, lr_t * mn / (np.sqrt(vn) + eps_hat),
                                   rtol=1e-12, atol=1e-300)


def test_eps_t_conventions_and_inverse():
    assert F.eps_t(1e-8, 0.999, 1) == 1e-8
    assert F.eps_t(1e-8, 0.999, 1, "tf") == pytest.approx(1e-8 / math.sqrt(0.001), rel=1e-12)
    assert F.eps_t(1e-8, 0.999, 10**7, "tf") == pytest.approx(1e-8, rel=1e-9)
    for mode in ("torch", "tf"):
        e = F.eps_t(3e-7, 0.98, 5, mode)
        assert F.eps_in_mode(e, 0.98, 5, mode) == pytest.approx(3e-7, rel=1e-12)
    with pytest.raises(ValueError, match="eps_mode"):
        F.eps_t(1e-8, 0.999, 1, "keras")


def test_bias_corrections_and_scalar_effective_step():
    assert F.bias_correction1(0.9, 1) == pytest.approx(0.1)
    assert F.bias_correction2(0.999, 2) == pytest.approx(1 - 0.999**2)
    d = F.effective_step(4e-6, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    assert d == pytest.approx(1e-3 / 0.1 / (math.sqrt(4e-6 / 1e-3) + 1e-8), rel=1e-12)


# ---------------------------------------------------------------- StableAdamW ratio


def test_g2v_is_stableadamw_algorithm_2():
    """Wortsman et al. 2023, Alg. 2: v_t includes g_t, RMS = sqrt(E[g^2 / max(v_hat, eps^2)])."""
    rng = np.random.default_rng(0)
    b2, t, eps = 0.95, 7, 1e-6
    v_prev = rng.random(200) * 1e-4
    g = rng.standard_normal(200) * 1e-2
    g[:20] = 0.0
    v_prev[:10] = 0.0  # g = v = 0 coordinates: ratio 0, not NaN
    v_t = b2 * v_prev + (1 - b2) * g * g
    v_hat = v_t / (1 - b2**t)
    rms_paper = math.sqrt(np.mean(g * g / np.maximum(v_hat, eps * eps)))

    v = F.second_moment_update(torch.tensor(v_prev), torch.tensor(g), b2)
    bc2 = F.bias_correction2(b2, t)
    assert F.g2v_rms(torch.tensor(g), v, bc2, eps) == pytest.approx(rms_paper, rel=1e-12)
    r = F.g2v_ratio(torch.tensor(g), v, bc2, eps)
    assert torch.isfinite(r).all()
    # bounded because v_t contains g_t: r <= bc2 / (1 - b2)
    assert float(r.max()) <= bc2 / (1 - b2) * (1 + 1e-12)
    assert F.update_clip_scale(0.5) == 1.0 and F.update_clip_scale(4.0) == 0.25


def test_g2v_zero_eps_zero_state_is_zero_not_nan():
    z = torch.zeros(5)
    assert F.g2v_rms(z, z, 0.1, 0.0) == 0.0
    assert F.g2v_rms(torch.zeros(0), torch.zeros(0), 0.1, 1e-8) == 0.0


# ---------------------------------------------------------------- stability bounds


def _spectral_radius(step_fn, n_state: int) -> float:
    """Spectral radius of a linear map given by applying it to the basis vectors."""
    cols = [np.asarray(step_fn(np.eye(n_state)[i]), dtype=float) for i in range(n_state)]
    return float(max(abs(np.linalg.eigvals(np.stack(cols, axis=1)))))


def _torch_sgd_map(a: float, lam: float, momentum: float, dampening: float, nesterov: bool):
    """(x_t, buf_{t-1}) -> (x_{t+1}, buf_t) of torch.optim.SGD on f = lam x^2/2, lr = a/lam."""

    def step(state):
        p = torch.nn.Parameter(torch.tensor([state[0]]))
        opt = torch.optim.SGD([p], lr=a / lam, momentum=momentum, dampening=dampening,
                              nesterov=nesterov, foreach=False)
        opt.state[p]["momentum_buffer"] = torch.tensor([state[1]])
        p.grad = lam * p.detach().clone()
        opt.step()
        return [p.item(), opt.state[p]["momentum_buffer"].item()]

    return step


def _check_bound(rho_of_a, bound: float):
    """Stable on (0, bound), unstable just above: the bound is where rho crosses 1."""
    for frac in (0.02, 0.3, 0.7, 0.95, 0.999):
        assert rho_of_a(frac * bound) < 1.0, frac
    assert rho_of_a(1.001 * bound) > 1.0


@pytest.mark.parametrize("momentum,dampening", [(0.5, 0.0), (0.9, 0.0), (0.99, 0.0), (0.9, 0.3)])
def test_heavy_ball_bound_is_torch_sgds_spectral_radius(momentum, dampening):
    bound = F.sgd_threshold(momentum, dampening, nesterov=False)
    assert bound == pytest.approx((2 + 2 * momentum) / (1 - dampening))
    _check_bound(lambda a: _spectral_radius(_torch_sgd_map(a, 3.0, momentum, dampening, False), 2),
                 bound)


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99])
def test_nesterov_bound_is_torch_sgds_spectral_radius(momentum):
    bound = F.sgd_threshold(momentum, 0.0, nesterov=True)
    _check_bound(lambda a: _spectral_radius(_torch_sgd_map(a, 3.0, momentum, 0.0, True), 2),
                 bound)
    if momentum == 0.9:
        assert bound == pytest.approx(1.357, abs=1e-3)  # not heavy ball's 3.8


def test_nesterov_with_dampening_matches_the_literal_update():
    """torch forbids nesterov with dampening; the formula's general case against the update."""
    mu, d, lam = 0.8, 0.4, 2.0

    def map_for(a):
        def step(s):
            x, buf = s
            g = lam * x
            buf = mu * buf + (1 - d) * g
            return [x - a / lam * (g + mu * buf), buf]
        return step

    _check_bound(lambda a: _spectral_radius(map_for(a), 2), F.nesterov_threshold(mu, d))


def test_gd_bound_and_momentum_zero_ignores_dampening():
    assert F.sgd_threshold(0.0, 0.5) == 2.0 == F.gd_threshold()
    # momentum 0: torch leaves the buffer alone, so the map lives on x alone
    _check_bound(lambda a: _spectral_radius(
        lambda s: _torch_sgd_map(a, 3.0, 0.0, 0.0, False)([s[0], 0.0])[:1], 1), 2.0)


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_adam_bound_is_torch_adams_spectral_radius_with_frozen_v(beta1):
    """torch.optim.Adam's (x, m) iteration at large t with v frozen (v >> g^2, finite
    differences around 0): a = lam * effective_step crosses rho = 1 at (2+2b1)/(1-b1)."""
    lam, b2, v0, t0, eps, h = 5.0, 0.999, 1.0, 10**6, 1e-8, 1e-9

    def rho(a):
        d = F.effective_step(b2 * v0, lr=1.0, beta1=beta1, beta2=b2, eps=eps, step=t0 + 1)
        lr = a / (lam * d)

        def step(s):
            p = torch.nn.Parameter(torch.tensor([s[0] * h]))
            opt = torch.optim.Adam([p], lr=lr, betas=(beta1, b2), eps=eps, foreach=False)
            opt.state[p].update(step=torch.tensor(float(t0)), exp_avg=torch.tensor([s[1] * h]),
                                exp_avg_sq=torch.tensor([v0]))
            p.grad = lam * p.detach().clone()
            opt.step()
            return [p.item() / h, opt.state[p]["exp_avg"].item() / h]

        return _spectral_radius(step, 2)

    bound = F.adam_threshold(beta1)
    assert bound == pytest.approx((2 + 2 * beta1) / (1 - beta1))
    _check_bound(rho, bound)
    assert F.threshold("adam", beta1=0.9) == pytest.approx(38.0)


def test_max_stable_lr_puts_torch_sgd_on_the_edge():
    lam, mu = 7.0, 0.9
    lr = 0.1
    bound = F.sgd_threshold(mu, 0.0, True)
    lr_max = F.max_stable_lr(lr, lr * lam, bound)
    assert lr_max == pytest.approx(bound / lam)
    r = _spectral_radius(_torch_sgd_map(lr_max * lam, lam, mu, 0.0, True), 2)
    assert r == pytest.approx(1.0, abs=1e-9)
    assert F.max_stable_lr(lr, 0.0, bound) == math.inf
    with pytest.raises(ValueError, match="kind"):
        F.threshold("lion")


def test_min_stable_eps_t_makes_the_eps_dominated_step_critical():
    lr, b1, t, lam = 1e-3, 0.9, 50, 4e3
    e = F.min_stable_eps_t(lr, b1, t, lam)
    d = F.effective_step(0.0, lr=lr, beta1=b1, beta2=0.999, eps=e, step=t)
    assert d * lam == pytest.approx(F.adam_threshold(b1), rel=1e-12)


# ---------------------------------------------------------------- secant curvature


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q @ torch.diag(torch.logspace(-2, 2, n)) @ q.T


def test_secant_curvature_is_the_eigenvalue_along_an_eigenvector():
    n = 12
    h = _spd(n, 1)
    d = torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.1
    # eigenpairs of P^-1 H = diag(d) H via the symmetric form (numpy, independent)
    s = np.sqrt(d.numpy())
    w, y = np.linalg.eigh(s[:, None] * h.numpy() * s[None, :])
    for k in (0, n // 2, n - 1):
        u = torch.tensor(s * y[:, k]) * 1e-3
        assert F.secant_curvature(u, h @ u, d) == pytest.approx(w[k], rel=1e-9)


def test_secant_curvature_of_a_real_adam_step_is_within_the_spectrum():
    n = 10
    h = _spd(n, 3)
    x = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(4)))
    opt = torch.optim.Adam([x], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        x.grad = h @ x.detach()
        g0 = x.grad.clone()
        before = x.detach().clone()
        opt.step()
    st = opt.state[x]
    d = F.effective_step(st["exp_avg_sq"], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                         step=int(st["step"]))
    u = x.detach() - before
    q = F.secant_curvature([u], [h @ x.detach() - g0], [d])
    eig = np.linalg.eigvals(np.diag(d.numpy()) @ h.numpy()).real
    assert eig.min() * (1 - 1e-9) <= q <= eig.max() * (1 + 1e-9)
    # SGD form: lr * u.dg / |u|^2 with d = lr (a float)
    q_sgd = F.secant_curvature(u, h @ u, 0.1)
    assert q_sgd == pytest.approx(0.1 * float(u @ h @ u) / float(u @ u), rel=1e-12)
    assert math.isnan(F.secant_curvature(torch.zeros(3), torch.zeros(3), 0.1))


def test_formulas_import_without_torch():
    import subprocess
    import sys

    code = "import sys, stablestep.formulas as f; f.adam_threshold(0.9); f.eps_t(1e-8,.9,1,'tf');"\
           " assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("eps_mode,amsgrad", [("torch", False), ("tf", True)])
def test_g2v_before_the_step_is_what_update_clipping_applies(eps_mode, amsgrad):
    """From the state a guard sees before step() and the new gradient, the RMS whose
    1/max(1, RMS) stablestep's StableAdamW applies (its reference path is checked against
    the paper in tests/optim/test_paths.py)."""
    from stablestep.optim import Adam

    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(50, generator=gen))
    opt = Adam([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-3, eps_mode=eps_mode, amsgrad=amsgrad,
               update_clipping=True, impl="reference")
    for t in range(1, 7):
        g = torch.randn(50, generator=gen) * (30.0 if t == 6 else 1.0)
        st = opt.state.get(p, {})
        if st:
            rms = F.g2v_rms_before_step(
                g, st["exp_avg_sq"], beta2=0.95, eps=1e-3, step=t, eps_mode=eps_mode,
                max_v_prev=st.get("max_exp_avg_sq"))
        p.grad = g
        opt.step()
        if t > 1:
            assert opt.state[p]["update_scale"] == pytest.approx(F.update_clip_scale(rms),
                                                                rel=1e-12)
    assert opt.state[p]["update_scale"] < 0.5  # the spike was clipped


def test_stableadamw_published_implementation_applies_the_same_ratio():
    """torch-optimi's StableAdamW (the paper's algorithm with debiased betas, its state
    already v_hat_t) and stablestep's AdamW(update_clipping=True), whose clip factor is
    update_clip_scale(g2v_rms(...)), agree through a clipped spike."""
    optimi = pytest.importorskip("optimi", reason="torch-optimi (dev extra) not installed")
    from stablestep.optim import AdamW

    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(200, generator=gen)
    grads = [torch.randn(200, generator=gen) * (40.0 if t == 5 else 1.0) for t in range(10)]
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    theirs = optimi.StableAdamW([a], foreach=False, **kw)
    ours = AdamW([b], update_clipping=True, impl="reference", **kw)
    scales = []
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        scales.append(ours.state[b]["update_scale"])
        # their state is v_hat_t itself: the ratio with bc2 = 1 is the same RMS
        rms = F.g2v_rms(g, theirs.state[a]["exp_avg_sq"], 1.0, 1e-6)
        assert F.update_clip_scale(rms) == pytest.approx(scales[-1], rel=1e-9)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-15)
    assert min(scales) < 0.5
