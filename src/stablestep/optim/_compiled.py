r"""``impl="compiled"``: single-pass C++ kernels for update clipping and AdamAtan2.

Why not ``torch.compile`` of the Python update: measured on the 25M-parameter benchmark
(1 thread, AVX2), inductor's own kernels for this math were 1.6-1.85x torch's fused Adam
for plain Adam, and its single-pass clipping reduction alone cost 1.3-1.5x a whole fused
Adam step (the float reduction goes through a cascade-summation helper, per-call dispatch
is ~50 us per tensor); the eager paths take 2.5x (clipping) and 7.4x (atan2). So the
kernels here are written by hand with ``at::vec`` (the vector classes inductor generates)
and built with inductor's C++ toolchain and on-disk cache
(``torch._inductor.codecache.CppPythonBindingsCodeCache``): lazily on first use, a few
seconds once per machine, then loaded from the cache. If that fails (no C++ compiler,
unsupported platform or torch version) the optimizers fall back to their eager fast path
with one warning.

One call per parameter group and step walks every tensor:

* **update clipping** (Adam/AdamW ``update_clipping=True``): pass 1 updates
  :math:`v_t = b_2 v + (1-b_2) g^2` (and AMSGrad's max) in place and accumulates
  :math:`\sum g^2/\max(\tilde v_t/bc_2, \epsilon_t^2)` in vector registers (a double per
  block); pass 2, while the tensor is still in cache, updates :math:`m` and :math:`\theta`
  with :math:`\mathrm{lr}\cdot s`, :math:`s = 1/\max(1, \mathrm{RMS})`.
* **AdamAtan2**: :math:`\theta \mathrel{-}= \mathrm{lr}\,a\,
  \operatorname{atan2}(c\,m_t, \sqrt{v_t})`, :math:`c = \sqrt{bc_2}/(b\,bc_1)`. float64 uses
  SLEEF's ``atan2`` (1 ulp) in one pass. float32 uses SLEEF's ``atanf`` polynomial on
  :math:`r = \min(|y|,x)/\max(|y|,x)` (:math:`\pi/2 - \operatorname{atan}(r)` where
  :math:`|y| > x`), a fraction of the cost of SLEEF's accurate ``atan2f``: relative error at
  most 1.71 float32 eps measured (every float32 of three binades around the branch switch
  and a dense grid of ratios over 83 decades; tested < 2 eps against float64
  ``torch.atan2``), absolute error under one subnormal ulp where the result is below
  ``FLT_MIN``. It runs in two passes per 256-element chunk (moments, square root and
  division into an L1 scratch, then polynomial and parameter): the same operations and bits
  as one pass, but the one-pass dependency chain (sqrt, div, 8 serial FMAs per vector) was
  too long for the out-of-order window, 1.45x -> 1.2x torch's fused Adam step. Where both
  moments are infinite it gives NaN (``atan2(inf, inf) = pi/4``); the parameters are
  already lost there.

Numerics equal :mod:`stablestep.optim._reference` up to rounding (``x/c`` computed as
``x*(1/c)``, FMA in ``lerp`` as in torch's fused kernel); tested at ``rtol=1e-12`` in float64.
With ``torch.get_num_threads() > 1`` the tensors of a group are spread over that many
OpenMP threads (one tensor per thread at a time: a group of one huge tensor runs on one).
"""

from __future__ import annotations

import threading
import warnings

import torch

from stablestep import formulas as F
from stablestep.optim._reference import AdamStep, Atan2Step

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

using T = @SCALAR@;
using V = at::vec::Vectorized<T>;
constexpr int64_t BLOCK = 2048;

struct Lerp {
    // torch's lerp(self, end, w): small weights start from `self`, large ones from `end`
    // (ATen Lerp.h), the choice made once per call instead of per vector
    bool small;
    V coef;
    explicit Lerp(T w) : small(std::abs(w) < T(0.5)), coef(small ? w : w - T(1)) {}
    inline V operator()(const V& self, const V& end) const {
        return at::vec::fmadd(coef, end - self, small ? self : end);
    }
};

#if @POLY@
// float32 atan2(y, x), x >= 0, in two halves (see kernel_atan2). Range reduction to
// w in [-1, 1]: atan2(y, x) = atan(y / x) where |y| <= x, else copysign(pi/2, y) + atan(-x / y),
// returned as w and that offset o (+0 or +-pi/2); the division is the only rounding here.
static inline void atan2_reduce(const V& y, const V& x, V& w, V& o) {
    const V sign(T(-0.0));
    V big = y.abs() > x;
    V num = V::blendv(y, x ^ sign, big);
    V den = V::blendv(at::vec::clamp_min(x, V(std::numeric_limits<T>::min())), y, big);
    w = num / den;  // 0/0 (m = v = 0) -> 0/min -> 0; |y| > x >= 0 keeps den away from 0
    o = big & ((y & sign) | V(T(1.5707963267948966)));
}

// atan(w) for |w| <= 1: SLEEF's atanf polynomial (the one behind its u35 atan2f), Horner
static inline V atan_poly(const V& w) {
    V t = w * w;
    V u = at::vec::fmadd(V(T(0.00282363896258175373077393)), t,
                         V(T(-0.0159569028764963150024414)));
    u = at::vec::fmadd(u, t, V(T(0.0425049886107444763183594)));
    u = at::vec::fmadd(u, t, V(T(-0.0748900920152664184570312)));
    u = at::vec::fmadd(u, t, V(T(0.106347933411598205566406)));
    u = at::vec::fmadd(u, t, V(T(-0.142027363181114196777344)));
    u = at::vec::fmadd(u, t, V(T(0.199926957488059997558594)));
    u = at::vec::fmadd(u, t, V(T(-0.333331018686294555664062)));
    return at::vec::fmadd(w * t, u, w);
}
#endif

// ptrs: 6 per tensor (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or 0, numel)
// hyp:  [lr, beta1, beta2, weight_decay] then 3 per tensor (bc1, bc2, eps_t)
// flags: 1 amsgrad, 2 maximize, 4 L2 weight decay, 8 decoupled weight decay,
//        bits 8+: threads (tensors are spread over them)
extern "C" void kernel(const int64_t* ptrs, const double* hyp, double* scales,
                       const int64_t ntensors, const int64_t flags) {
    const bool ams = flags & 1, maximize = flags & 2, l2 = flags & 4, decoupled = flags & 8;
    const double lr0 = hyp[0], b1 = hyp[1], b2 = hyp[2], wd = hyp[3];
    const T tb2 = T(b2), t1b2 = T(1 - b2), twd = T(wd);
    const Lerp lerp(T(1 - b1));
    const double tiny = std::numeric_limits<T>::min();
    const int nthreads = int(std::max<int64_t>(1, flags >> 8));
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if(nthreads > 1)
    for (int64_t i = 0; i < ntensors; ++i) {
        T* p = reinterpret_cast<T*>(ptrs[6 * i]);
        const T* g = reinterpret_cast<const T*>(ptrs[6 * i + 1]);
        T* m = reinterpret_cast<T*>(ptrs[6 * i + 2]);
        T* v = reinterpret_cast<T*>(ptrs[6 * i + 3]);
        T* vmax = reinterpret_cast<T*>(ptrs[6 * i + 4]);
        const int64_t n = ptrs[6 * i + 5];
        const double bc1 = hyp[4 + 3 * i], bc2 = hyp[5 + 3 * i], eps_t = hyp[6 + 3 * i];
        T* vd = ams ? vmax : v;
        // pass 1: second moment (and AMSGrad max) in place, sum of g^2 / max(v_hat, eps_t^2)
        const V inv_bc2(T(1.0 / bc2));
        const V floor(T(std::max(eps_t * eps_t, tiny)));
        double acc = 0.0;
        for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
            const int64_t b1e = std::min(n, b0 + BLOCK);
            auto term = [&](int64_t j, int64_t k) {
                V gg = V::loadu(g + j, k);
                if (maximize) gg = gg.neg();
                if (l2) gg = at::vec::fmadd(V(twd), V::loadu(p + j, k), gg);
                V g2 = gg * gg;
                V vt = at::vec::fmadd(V::loadu(v + j, k), V(tb2), g2 * V(t1b2));
                vt.store(v + j, k);
                if (ams) {
                    vt = at::vec::maximum(V::loadu(vmax + j, k), vt);
                    vt.store(vmax + j, k);
                }
                return g2 / at::vec::clamp_min(vt * inv_bc2, floor);
            };
            V s0(T(0)), s1(T(0));
            int64_t j = b0;
            for (; j + 2 * V::size() <= b1e; j += 2 * V::size()) {
                s0 = s0 + term(j, V::size());
                s1 = s1 + term(j + V::size(), V::size());
            }
            for (; j < b1e; j += V::size())
                s0 = s0 + term(j, std::min<int64_t>(V::size(), b1e - j));
            V s = s0 + s1;
            T tmp[V::size()];
            s.store(tmp);
            for (int64_t q = 0; q < V::size(); ++q) acc += double(tmp[q]);
        }
        double scale = 1.0;
        if (n > 0) scale = 1.0 / std::max(1.0, std::sqrt(std::max(acc / double(n), 0.0)));
        scales[i] = scale;
        // pass 2: first moment and parameter with lr * scale
        const double lr = lr0 * scale;
        const V pdecay(T(1 - lr * wd));
        const V neg_step(T(-lr / bc1));
        const V inv_sqrt_bc2(T(1.0 / std::sqrt(bc2)));
        const V eps = V(T(eps_t));
        auto update = [&](int64_t j, int64_t k) {
            V pp = V::loadu(p + j, k);
            V gg = V::loadu(g + j, k);
            if (maximize) gg = gg.neg();
            if (l2) gg = at::vec::fmadd(V(twd), pp, gg);
            V mm = lerp(V::loadu(m + j, k), gg);
            mm.store(m + j, k);
            if (decoupled) pp = pp * pdecay;
            V denom = V::loadu(vd + j, k).sqrt() * inv_sqrt_bc2 + eps;
            pp = at::vec::fmadd(neg_step, mm / denom, pp);
            pp.store(p + j, k);
        };
        int64_t j = 0;
        for (; j + V::size() <= n; j += V::size()) update(j, V::size());  // full vectors
        if (j < n) update(j, n - j);
    }
}

// AdamAtan2. ptrs: 6 per tensor (param, grad, exp_avg, exp_avg_sq, numel, float32 step or 0)
// hyp: [lr, beta1, beta2, weight_decay, a, b] then 2 per tensor (bc1, bc2: read where the
// step pointer is 0, else the step is incremented here as torch's foreach_add would, and
// bc = 1 - beta^t with the same libm pow as Python's float **); flags: 2 maximize
extern "C" void kernel_atan2(const int64_t* ptrs, const double* hyp,
                             const int64_t ntensors, const int64_t flags) {
    const bool maximize = flags & 2;
    const double lr = hyp[0], b1 = hyp[1], b2 = hyp[2], wd = hyp[3], a = hyp[4], b = hyp[5];
    const T tb2 = T(b2), t1b2 = T(1 - b2);
    const Lerp lerp(T(1 - b1));
    const V pdecay(T(1 - lr * wd)), alpha(T(-lr * a));
    const int nthreads = int(std::max<int64_t>(1, flags >> 8));
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if(nthreads > 1)
    for (int64_t i = 0; i < ntensors; ++i) {
        T* p = reinterpret_cast<T*>(ptrs[6 * i]);
        const T* g = reinterpret_cast<const T*>(ptrs[6 * i + 1]);
        T* m = reinterpret_cast<T*>(ptrs[6 * i + 2]);
        T* v = reinterpret_cast<T*>(ptrs[6 * i + 3]);
        const int64_t n = ptrs[6 * i + 4];
        float* step = reinterpret_cast<float*>(ptrs[6 * i + 5]);
        double bc1 = hyp[6 + 2 * i], bc2 = hyp[7 + 2 * i];
        if (step != nullptr) {
            *step += 1.0f;
            const double t = double(*step);
            bc1 = 1.0 - std::pow(b1, t);
            bc2 = 1.0 - std::pow(b2, t);
        }
        const V c(T(std::sqrt(bc2) / (b * bc1)));
        auto moments = [&](int64_t j, int64_t k, V& mm, V& vv) {
            V gg = V::loadu(g + j, k);
            if (maximize) gg = gg.neg();
            mm = lerp(V::loadu(m + j, k), gg);
            mm.store(m + j, k);
            vv = at::vec::fmadd(V::loadu(v + j, k), V(tb2), gg * gg * V(t1b2));
            vv.store(v + j, k);
        };
        auto param = [&](int64_t j, int64_t k, const V& angle) {
            V pp = V::loadu(p + j, k);
            if (wd != 0) pp = pp * pdecay;
            pp = at::vec::fmadd(angle, alpha, pp);
            pp.store(p + j, k);
        };
#if @POLY@
        // Two passes over chunks of CHUNK elements (2 KB of scratch, in L1): moments and
        // range reduction, then polynomial and parameter. Same operations, same bits as one
        // pass, but each pass's dependency chain (sqrt -> div, 8 FMAs) is short enough for the
        // out-of-order window to overlap many vectors: measured 1.45x -> 1.15-1.2x torch's
        // fused Adam step (25M float32 parameters, 1 thread, Zen 3).
        constexpr int64_t CHUNK = 256;
        alignas(64) T wbuf[CHUNK];
        alignas(64) T obuf[CHUNK];
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t len = std::min(CHUNK, n - c0);
            auto first = [&](int64_t j, int64_t k) {
                V mm, vv, w, o;
                moments(c0 + j, k, mm, vv);
                atan2_reduce(mm * c, vv.sqrt(), w, o);
                w.store(wbuf + j);  // whole vectors: CHUNK is a multiple of V::size()
                o.store(obuf + j);
            };
            auto second = [&](int64_t j, int64_t k) {
                param(c0 + j, k, atan_poly(V::loadu(wbuf + j)) + V::loadu(obuf + j));
            };
            int64_t j = 0;
            for (; j + V::size() <= len; j += V::size()) first(j, V::size());  // full vectors
            if (j < len) first(j, len - j);
            for (j = 0; j + V::size() <= len; j += V::size()) second(j, V::size());
            if (j < len) second(j, len - j);
        }
#else
        auto update = [&](int64_t j, int64_t k) {
            V mm, vv;
            moments(j, k, mm, vv);
            param(j, k, (mm * c).atan2(vv.sqrt()));  // SLEEF's atan2, 1 ulp
        };
        int64_t j = 0;
        for (; j + V::size() <= n; j += V::size()) update(j, V::size());  // full vectors
        if (j < n) update(j, n - j);
#endif
    }
}

extern "C" void kernel_entry(const int64_t* ptrs, const double* hyp, double* scales,
                             const int64_t ntensors, const int64_t flags, const int64_t which) {
    if (which == 0) kernel(ptrs, hyp, scales, ntensors, flags);
    else kernel_atan2(ptrs, hyp, ntensors, flags);
}
"""

_ARGTYPES = ["const int64_t*", "const double*", "double*", "const int64_t", "const int64_t",
             "const int64_t"]
_DTYPES = {torch.float32: "float", torch.float64: "double"}
_lock = threading.Lock()
_kernels: dict[torch.dtype, object] = {}
_failed: dict[torch.dtype, str] = {}


def _source(dtype: torch.dtype) -> str:
    src = _SOURCE.replace("@SCALAR@", _DTYPES[dtype]).replace(
        "@POLY@", "1" if dtype == torch.float32 else "0")
    # the binding calls the function named `kernel`: rename so the dispatcher is the entry
    return (src.replace('extern "C" void kernel(', 'static void kernel_clip(')
            .replace("if (which == 0) kernel(", "if (which == 0) kernel_clip(")
            .replace('extern "C" void kernel_entry(', 'extern "C" void kernel('))


def load(dtype: torch.dtype):
    """The compiled kernel for ``dtype`` (float32/float64), or ``None`` where it cannot be
    built here (the reason is warned once per process and dtype)."""
    if dtype in _kernels:
        return _kernels[dtype]
    if dtype in _failed or dtype not in _DTYPES:
        return None
    with _lock:
        if dtype in _kernels:
            return _kernels[dtype]
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            fn = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, _source(dtype))
        except Exception as exc:  # no compiler, unsupported platform/torch: eager fallback
            _failed[dtype] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(
                "stablestep: impl='compiled' could not build its C++ kernel "
                f"({_failed[dtype]}); using the eager fast path instead",
                RuntimeWarning, stacklevel=3,
            )
            return None
        _kernels[dtype] = fn
        return fn


def supported(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is a contiguous CPU float32/float64 tensor of one dtype."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in _DTYPES and all(
        t.is_cpu and t.dtype is dtype and t.is_contiguous() for t in tensors
    )


def _threads(n_tensors: int) -> int:
    """torch's intra-op thread count (at most one per tensor), in the flags' bits 8+."""
    return min(torch.get_num_threads(), max(n_tensors, 1)) << 8


def adam_clip(kernel, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
              h: AdamStep) -> list[float]:
    """Adam/AdamW with update clipping in one kernel call; returns the per-tensor scales."""
    torch._foreach_add_(steps, 1)
    n = len(params)
    hyp = [h.lr, h.beta1, h.beta2, h.weight_decay]
    for s in steps:
        t = float(s)
        hyp += [F.bias_correction1(h.beta1, t), F.bias_correction2(h.beta2, t),
                F.eps_t(h.eps, h.beta2, t, h.eps_mode)]
    maxs = max_exp_avg_sqs if h.amsgrad else [None] * n
    ptrs = []
    for p, g, m, v, vm in zip(params, grads, exp_avgs, exp_avg_sqs, maxs, strict=True):
        ptrs += [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                 vm.data_ptr() if vm is not None else 0, p.numel()]
    flags = (
        _threads(n) | (1 if h.amsgrad else 0) | (2 if h.maximize else 0)
        | (4 if h.weight_decay != 0 and not h.decoupled_weight_decay else 0)
        | (8 if h.weight_decay != 0 and h.decoupled_weight_decay else 0)
    )
    scales = torch.empty(n, dtype=torch.float64)
    kernel(torch.tensor(ptrs, dtype=torch.int64), torch.tensor(hyp, dtype=torch.float64),
           scales, n, flags, 0)
    return scales.tolist()


def atan2_step(kernel, params, grads, exp_avgs, exp_avg_sqs, steps, h: Atan2Step) -> None:
    """AdamAtan2 step in one kernel call. float32 CPU step counters (the optimizer's own) are
    incremented by the kernel (torch's ``_foreach_add_`` over 100 scalars costs ~1% of a
    25M-parameter step); others as before, in Python."""
    n = len(params)
    hyp = [h.lr, h.beta1, h.beta2, h.weight_decay, h.a, h.b]
    if all(s.is_cpu and s.dtype is torch.float32 and s.dim() == 0 for s in steps):
        step_ptrs = [s.data_ptr() for s in steps]
        hyp += [0.0, 0.0] * n
    else:
        torch._foreach_add_(steps, 1)
        step_ptrs = [0] * n
        for s in steps:
            t = float(s)
            hyp += [F.bias_correction1(h.beta1, t), F.bias_correction2(h.beta2, t)]
    ptrs = []
    for p, g, m, v, sp in zip(params, grads, exp_avgs, exp_avg_sqs, step_ptrs, strict=True):
        ptrs += [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), sp]
    kernel(torch.tensor(ptrs, dtype=torch.int64), torch.tensor(hyp, dtype=torch.float64),
           torch.empty(0, dtype=torch.float64), n, _threads(n) | (2 if h.maximize else 0), 1)
