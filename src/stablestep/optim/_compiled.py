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

import os
import shutil
import threading
import warnings

import torch

from stablestep import formulas as F
from stablestep.optim._reference import AdamStep, Atan2Step

KERNEL_FILE = "_kernels.cpp"  # package data next to this module


def kernel_source() -> str:
    """The C++ source of the kernels (``stablestep/optim/_kernels.cpp``, shipped as package
    data), before the per-dtype substitutions of :func:`_source`."""
    from importlib import resources

    return resources.files("stablestep.optim").joinpath(KERNEL_FILE).read_text(encoding="utf-8")

_ARGTYPES = ["const int64_t*", "const double*", "double*", "const int64_t", "const int64_t",
             "const int64_t"]
_DTYPES = {torch.float32: "float", torch.float64: "double"}
_lock = threading.Lock()
_kernels: dict[torch.dtype, object] = {}
_failed: dict[torch.dtype, str] = {}


def _source(dtype: torch.dtype) -> str:
    src = kernel_source().replace("@SCALAR@", _DTYPES[dtype]).replace(
        "@POLY@", "1" if dtype == torch.float32 else "0")
    # the binding calls the function named `kernel`: rename so the dispatcher is the entry
    return (src.replace('extern "C" void kernel(', 'static void kernel_clip(')
            .replace("if (which == 0) kernel(", "if (which == 0) kernel_clip(")
            .replace('extern "C" void kernel_entry(', 'extern "C" void kernel('))


def compiler_missing() -> str | None:
    """Why inductor finds no usable C++ compiler here, or ``None`` when it does (then
    :func:`load` must succeed: a failure is a bug, not a missing tool)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or a torch without cpp_builder
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if shutil.which(cxx) is None and not os.path.isfile(cxx):
        return f"C++ compiler {cxx!r} not found on PATH"
    return None


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
