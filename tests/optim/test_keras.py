"""eps_mode="tf" equals Keras 3's Adam (torch backend) to float32 precision; schedules equal
Keras' ExponentialDecay and CosineDecay."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from stablestep.optim import Adam, schedules  # noqa: E402

keras = pytest.importorskip("keras")  # a dev dependency: installed by `make setup`
if keras.backend.backend() != "torch":  # pragma: no cover - keras imported elsewhere first
    pytest.fail(f"Keras must run on the torch backend, got {keras.backend.backend()}")

SHAPES = [(6, 4), (4,)]
# Small gradients make sqrt(v) ~ eps, where the two epsilon conventions part ways.
SCALE, EPS, LR = 1e-3, 1e-3, 1e-2


def _grads(n_steps=20):
    rng = np.random.default_rng(0)
    return [[(SCALE * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]
            for _ in range(n_steps)]


def _init():
    rng = np.random.default_rng(1)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _keras_run(grads, amsgrad):
    vars_ = [keras.Variable(x.copy()) for x in _init()]
    opt = keras.optimizers.Adam(learning_rate=LR, beta_1=0.9, beta_2=0.999, epsilon=EPS,
                                amsgrad=amsgrad)
    for gs in grads:
        opt.apply_gradients([(torch.from_numpy(g), v) for g, v in zip(gs, vars_, strict=True)])
    moments = {v.path.split("/")[-1]: v.value.detach().numpy() for v in opt.variables}
    return [v.value.detach().numpy() for v in vars_], moments


def _ours_run(grads, amsgrad, eps_mode, impl="auto"):
    params = [torch.tensor(x.copy(), requires_grad=True) for x in _init()]
    opt = Adam(params, lr=LR, betas=(0.9, 0.999), eps=EPS, amsgrad=amsgrad, eps_mode=eps_mode,
               impl=impl)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return [p.detach().numpy() for p in params], opt.state[params[0]]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_tf_mode_equals_keras_adam(amsgrad, impl):
    grads = _grads()
    want, moments = _keras_run(grads, amsgrad)
    got, state = _ours_run(grads, amsgrad, "tf", impl)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
    # first tensor's moments (Keras names them after the variable, suffix _momentum/_velocity)
    m = next(v for k, v in moments.items() if k.endswith("_momentum"))
    v = next(v for k, v in moments.items() if k.endswith("_velocity"))
    np.testing.assert_allclose(state["exp_avg"].numpy(), m, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(state["exp_avg_sq"].numpy(), v, rtol=1e-5, atol=1e-14)


def test_torch_mode_differs_from_keras():
    """The comparison above can fail: the PyTorch convention is measurably different here."""
    grads = _grads()
    want, _ = _keras_run(grads, False)
    got, _ = _ours_run(grads, False, "torch")
    init = _init()
    step_tf = np.abs(want[0] - init[0]).max()
    diff = np.abs(got[0] - want[0]).max()
    assert diff > 0.05 * step_tf


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_equals_keras(staircase):
    ks = keras.optimizers.schedules.ExponentialDecay(0.15, 7, 0.5, staircase=staircase)
    ours = schedules.exponential_decay(7, 0.5, staircase=staircase) * 0.15
    for step in range(0, 40):
        assert ours(step) == pytest.approx(float(ks(step)), rel=1e-6)


def test_cosine_equals_keras():
    ks = keras.optimizers.schedules.CosineDecay(2.0, 30, alpha=0.1)
    ours = schedules.cosine(30, alpha=0.1) * 2.0
    for step in range(0, 45):
        assert ours(step) == pytest.approx(float(ks(step)), rel=1e-5, abs=1e-7)
