"""impl='compiled' (C++ kernels for update clipping and AdamAtan2) equals the reference path,
its float32 atan2 is accurate against float64 torch.atan2, and it falls back cleanly.

Tests that compare the kernel take the ``kernel`` fixture: it skips (with the reason) only
where inductor finds no C++ compiler, and fails a test in which no step reached the C++
kernel, so an eager fallback can no longer pass for the kernel."""

import copy
import itertools
import math
import warnings

import pytest
import torch

from stablestep.optim import Adam, AdamAtan2, AdamW, _compiled
from tests.optim.conftest import grad_sequence, make_params, run
from tests.optim.test_paths import SPIKE, _state_equal


@pytest.fixture
def kernel(monkeypatch):
    """Count the calls that reach the C++ kernels; the test fails if there were none."""
    why = _compiled.compiler_missing()
    if why is not None:
        pytest.skip(f"no C++ compiler here ({why}): impl='compiled' runs its eager fallback")
    calls: list[str] = []

    def spy(name, real):
        def counted(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return counted

    for name in ("adam_clip", "atan2_step"):
        monkeypatch.setattr(_compiled, name, spy(name, getattr(_compiled, name)))
    yield calls
    assert calls, f"impl='compiled' never reached the C++ kernel (build: {_compiled._failed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernel_is_built_here(dtype):
    """With a compiler present the kernel builds from the packaged .cpp file."""
    why = _compiled.compiler_missing()
    if why is not None:
        pytest.skip(f"no C++ compiler here ({why})")
    assert "kernel_atan2" in _compiled.kernel_source()
    assert _compiled.load(dtype) is not None, _compiled._failed.get(dtype)


@pytest.mark.parametrize(
    "eps_mode,amsgrad,wd,maximize",
    [(e, a, w, False) for e, a, w in itertools.product(["torch", "tf"], [False, True],
                                                        ["l2", "decoupled"])]
    + [("torch", False, "decoupled", True)],
)
def test_clipping_compiled_equals_reference(eps_mode, amsgrad, wd, maximize, kernel):
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, amsgrad=amsgrad, eps_mode=eps_mode,
              update_clipping=True, weight_decay=0.05, decoupled_weight_decay=wd == "decoupled",
              maximize=maximize)
    pa, pb = make_params(), make_params()
    fast, ref = Adam(pa, impl="compiled", **kw), Adam(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 20, spike_at=SPIKE)
    run(fast, pa, grads[: SPIKE + 1])
    run(ref, pb, grads[: SPIKE + 1])
    assert min(ref.state[p]["update_scale"] for p in pb) < 0.5  # the spike was clipped
    run(fast, pa, grads[SPIKE + 1 :])
    run(ref, pb, grads[SPIKE + 1 :])
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


def test_clipping_compiled_float32_close_to_reference(kernel):
    pa, pb = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, update_clipping=True, amsgrad=True)
    fast, ref = AdamW(pa, impl="compiled", **kw), AdamW(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 20, spike_at=SPIKE)
    run(fast, pa, grads)
    run(ref, pb, grads)
    _state_equal(fast, ref, pa, pb, rtol=2e-5)


@pytest.mark.parametrize("maximize", [False, True])
def test_atan2_compiled_equals_reference(maximize, kernel):
    pa, pb = make_params(), make_params()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, b=0.5, maximize=maximize)
    fast, ref = AdamAtan2(pa, impl="compiled", **kw), AdamAtan2(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 20, spike_at=SPIKE)
    run(fast, pa, grads)
    run(ref, pb, grads)
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


def _kernel_atan2(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """atan2(m, sqrt(v)) exactly as the float32 kernel computes it, in float64: betas 0.5
    with g = 0 halve stored moments 2m, 2v exactly, and the bias corrections are 1.0 in
    double at t = 1001, so p = 0 - lr*a*atan2(m, sqrt(v)) with lr = a = 1."""
    n = m.numel()
    p = torch.zeros(n, requires_grad=True)
    opt = AdamAtan2([p], lr=1.0, betas=(0.5, 0.5), a=1.0, impl="compiled")
    p.grad = torch.zeros(n)
    opt.step()  # creates the state
    state = opt.state[p]
    state["exp_avg"].copy_(2 * m)
    state["exp_avg_sq"].copy_(2 * v)
    state["step"].fill_(1000.0)
    p.data.zero_()
    opt.step()
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
    return -p.detach().double()


F32 = torch.finfo(torch.float32)


def _rel_err(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Relative error against float64 torch.atan2 on the same float32 moments, where the
    true value is a normal float32 (below that: absolute error, checked separately)."""
    got = _kernel_atan2(m, v)
    exact = torch.atan2(m.double(), v.double().sqrt())
    normal = exact.abs() >= F32.tiny
    sub_err = (got - exact)[~normal].abs()  # results below FLT_MIN: within one subnormal ulp
    assert sub_err.numel() == 0 or float(sub_err.max()) <= F32.smallest_normal * 2**-23
    return ((got - exact).abs() / exact.abs())[normal]


def test_atan2_compiled_float32_accuracy_dense_grid(kernel):
    """The float32 kernel's atan2 (range reduction + SLEEF's atanf polynomial) against
    float64 torch.atan2: |m|/sqrt(v) over 83 decades (subnormal m up to 1e38) with m and
    with v varying, every float32 within 2^16 ulps of the branch switch at 1, v with an
    irrational square root; documented max 1.71 float32 eps (exhaustive binade search,
    docs/optim.md), asserted < 2 eps."""
    dec = torch.logspace(-45, 38, 200_001, dtype=torch.float64).float()
    k = torch.arange(-(2**16), 2**16 + 1, dtype=torch.float64)
    near1 = (1 + k * 2**-23).float()
    ones = torch.ones
    sq = dec.double().square().clamp(min=1e-45, max=1.7e38).float()
    cases = [
        (torch.cat([dec, -dec]), ones(2 * dec.numel())),  # m varies, v = 1
        (ones(sq.numel()), sq),  # v varies
        (-dec, torch.full_like(dec, 3.0)),  # sqrt(3): rounded x
        (near1, ones(near1.numel())),
        (ones(near1.numel()), near1),
        (3 * near1, torch.full_like(near1, 9.0) * near1),
    ]
    worst = max(float(_rel_err(m, v).max()) for m, v in cases)
    assert worst < 2 * F32.eps, worst / F32.eps  # measured 1.51 on this grid


def test_atan2_compiled_float32_accuracy_random_and_special(kernel):
    """Random moments over 12 decades of |m|/sqrt(v), and the special values
    (0/0 -> 0, m/0 -> +-pi/2, 1e38 vs 1e-45 both ways)."""
    n = 200_003
    g = torch.Generator().manual_seed(0)
    m = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    v = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)).square()
    assert float(_rel_err(m, v).max()) < 2 * F32.eps  # measured 1.43
    special_m = torch.tensor([0.0, 0.0, 3.0, -3.0, 1e38, -1e38, 1e-45, 1e-45])
    special_v = torch.tensor([0.0, 1.0, 0.0, 0.0, 1e-45, 0.0, 1e38, 0.0])
    got = _kernel_atan2(special_m, special_v).tolist()
    hp = math.pi / 2
    assert got == pytest.approx([0.0, 0.0, hp, -hp, hp, -hp, 0.0, hp], abs=1e-7)


def test_compiled_save_load_continue(kernel):
    pa, pb = make_params(), make_params()
    kw = dict(lr=1e-2, update_clipping=True, amsgrad=True)
    a = AdamW(pa, impl="compiled", **kw)
    grads = grad_sequence(pa, 10, spike_at=4)
    run(a, pa, grads[:5])
    for x, y in zip(pa, pb, strict=True):
        y.data.copy_(x.data)
    b = AdamW(pb, impl="compiled", **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    run(a, pa, grads[5:])
    run(b, pb, grads[5:])
    _state_equal(a, b, pa, pb, rtol=0)


def test_non_contiguous_and_no_clipping_take_the_eager_path():
    pa, pb = make_params(), make_params()
    pa[0] = pa[0].detach().t().requires_grad_()  # non-contiguous: eager fast path
    pb[0] = pb[0].detach().t().requires_grad_()
    for clip in (True, False):
        kw = dict(lr=1e-2, update_clipping=clip)
        fast, ref = Adam(pa, impl="compiled", **kw), Adam(pb, impl="reference", **kw)
        # gradients laid out like their parameters, as autograd makes them (torch's fused
        # kernel, which the eager fallback uses, assumes it)
        grads = [[torch.empty_like(p).copy_(g) for p, g in zip(pa, gs, strict=True)]
                 for gs in grad_sequence(pa, 5)]
        run(fast, pa, grads)
        run(ref, pb, grads)
        _state_equal(fast, ref, pa, pb, rtol=1e-12)


def test_no_compiler_warns_once_and_falls_back(monkeypatch):
    from torch._inductor import codecache

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", broken)
    monkeypatch.setattr(_compiled, "_kernels", {})
    monkeypatch.setattr(_compiled, "_failed", {})
    pa, pb = make_params(), make_params()
    fast, ref = AdamAtan2(pa, impl="compiled"), AdamAtan2(pb, impl="reference")
    grads = grad_sequence(pa, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fast, pa, grads)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    run(ref, pb, grads)
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


def test_threads_give_identical_results(kernel):
    """Tensors are spread over OpenMP threads; each is still computed the same way."""
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the autouse fixture restores the count
        ps = make_params(dtype=torch.float32)
        opts = [AdamW(ps[:2], lr=1e-2, update_clipping=True, impl="compiled"),
                AdamAtan2(ps[2:], lr=1e-2, impl="compiled")]
        for gs in grad_sequence(ps, 6, spike_at=3):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
            for opt in opts:
                opt.step()
        out.append(ps)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["clip_tf", "atan2"])
def test_uneven_step_counts(which, kernel):
    """A tensor without a gradient skips a step: per-tensor step counts then differ."""
    def make(ps, impl):
        if which == "atan2":
            return AdamAtan2(ps, lr=1e-2, impl=impl)
        return AdamW(ps, lr=1e-2, eps=1e-3, eps_mode="tf", update_clipping=True, impl=impl)

    pa, pb = make_params(), make_params()
    fast, ref = make(pa, "compiled"), make(pb, "reference")
    for t, gs in enumerate(grad_sequence(pa, 8, spike_at=5)):
        for opt, ps in ((fast, pa), (ref, pb)):
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                p.grad = None if (i == 1 and t < 3) else g.clone()
            opt.step()
    assert float(fast.state[pa[1]]["step"]) == 5.0
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


def test_atan2_step_counters_in_and_out_of_the_kernel(kernel):
    """The optimizer's float32 step counters are incremented inside the kernel; counters of
    another dtype (e.g. from a loaded state dict) are incremented in Python instead. Both
    equal the reference path, counters included."""
    pa, pb = make_params(), make_params()
    fast = AdamAtan2(pa, lr=1e-2, impl="compiled")
    ref = AdamAtan2(pb, lr=1e-2, impl="reference")
    grads = grad_sequence(pa, 6)
    run(fast, pa, grads[:3])
    run(ref, pb, grads[:3])
    assert fast.state[pa[0]]["step"].dtype == torch.float32
    _state_equal(fast, ref, pa, pb, rtol=1e-12)
    for opt, ps in ((fast, pa), (ref, pb)):
        for p in ps[1:]:
            opt.state[p]["step"] = opt.state[p]["step"].double()
    run(fast, pa, grads[3:])
    run(ref, pb, grads[3:])
    assert fast.state[pa[1]]["step"].dtype == torch.float64
    assert [float(fast.state[p]["step"]) for p in pa] == [6.0] * len(pa)
    _state_equal(fast, ref, pa, pb, rtol=1e-12)
