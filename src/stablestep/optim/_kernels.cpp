// stablestep impl="compiled": single-pass kernels for update clipping and AdamAtan2.
// Read by stablestep/optim/_compiled.py (see its docstring for the math and the design);
// @SCALAR@ and @POLY@ are substituted there per dtype before inductor's C++ toolchain
// builds it. Shipped as package data (pyproject.toml [tool.setuptools.package-data]).
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
