r"""Per-step statistics of gradients, updates and Adam's state (pure functions).

The Monitor gathers tensors and calls these; they return plain ``{name: float}``
dicts keyed by :mod:`stablestep.telemetry.names`. Everything is read through
:mod:`stablestep.optim.inspect`, so torch's Adam/AdamW/SGD and stablestep's
optimizers (either epsilon convention) are handled in one place.

Adam statistics, for parameter coordinates :math:`i` after step :math:`t`
(:math:`\hat v = v / (1-\beta_2^t)`, ``max_exp_avg_sq`` under AMSGrad, and
:math:`\epsilon_t` the epsilon in PyTorch's convention). Each quantity is computed by its
one definition in :mod:`stablestep.formulas` (``bias_correction2``, ``eps_t``,
``effective_step``, ``g2v_ratio``); the equations are repeated here to say what is stored:

* effective step :math:`s_i = \frac{\mathrm{lr}/(1-\beta_1^t)}{\sqrt{\hat v_i} + \epsilon_t}`
  (the diagonal of :math:`P^{-1}`): quantiles p50/p90/p99 from a fixed uniform sample of
  coordinates (:class:`CoordinateSample`), and the exact max;
* epsilon share :math:`\frac{1}{n}\#\{i : \sqrt{\hat v_i} < \epsilon_t\}`;
* StableAdamW's ratio :math:`r_i = g_i^2 / \max(\hat v_i, \epsilon_t^2)` with the
  current step's :math:`\hat v` (the moment the update divided by):
  ``g2v_rms`` :math:`= \sqrt{\tfrac1n \sum_i r_i}` and ``g2v_max`` :math:`= \max_i r_i`;
* AMSGrad gap :math:`\sum_i (\max v_i - v_i) / \sum_i \max v_i`.

Update statistics (:math:`u = \theta_{t+1} - \theta_t`): ``update_norm`` :math:`\|u\|`,
``update_ratio`` :math:`\|u\|/\|\theta_t\|`, ``update_cos``
:math:`\langle u, -g\rangle / (\|u\|\,\|g\|)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stablestep import formulas as F
from stablestep.optim import inspect
from stablestep.telemetry import names as N
from stablestep.telemetry.secant import from_parts

QUANTILES = ((0.5, N.EFF_STEP_P50), (0.9, N.EFF_STEP_P90), (0.99, N.EFF_STEP_P99))


class CoordinateSample:
    """A fixed uniform sample of ``size`` coordinates across a list of tensors.

    Quantiles over hundreds of millions of coordinates are estimated from the sample
    (drawn once, uniformly with replacement, with a seeded generator, so the curve is
    consistent across steps) instead of sorting every coordinate. The rank error of a
    sample quantile has standard deviation :math:`\\sqrt{q(1-q)/\\text{size}}`: about
    0.0004 for p99 with the default 65,536 coordinates. When the tensors hold no
    more than ``size`` coordinates, all of them are used and the quantiles are exact.
    """

    def __init__(self, numels: Sequence[int], size: int = 65536, *, seed: int = 0):
        if size < 1:
            raise ValueError(f"Invalid quantile sample size: {size}")
        total = int(sum(numels))
        self.total = total
        self.exact = total <= size
        self.index: list[torch.Tensor | None] = []
        if self.exact:
            self.index = [None] * len(numels)
            return
        gen = torch.Generator().manual_seed(seed)
        # with replacement: O(size) memory however many coordinates there are
        flat = torch.randint(0, total, (size,), generator=gen).sort().values
        start = 0
        for n in numels:
            lo = int(torch.searchsorted(flat, start))
            hi = int(torch.searchsorted(flat, start + n))
            self.index.append(flat[lo:hi] - start)
            start += n

    def take(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sampled coordinates of tensor ``i`` (``x`` must have that tensor's size)."""
        idx = self.index[i]
        flat = x.reshape(-1)
        if idx is None:
            return flat
        if idx.device != flat.device:
            idx = self.index[i] = idx.to(flat.device)
        return torch.index_select(flat, 0, idx)


class Scratch:
    """Reusable flat work buffers, one per key, grown to the largest tensor seen.

    A freshly allocated large CPU tensor page-faults on first touch, which costs more
    than the arithmetic; reusing buffers keeps a statistics pass at memory speed.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer shaped like ``like`` (contents undefined)."""
        dtype = dtype or like.dtype
        n = like.numel()
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
            size = max(n, buf.numel() if buf is not None else 0)
            buf = self._bufs[key] = torch.empty(size, dtype=dtype, device=like.device)
        return buf[:n].view(like.shape)


def quantiles(values: torch.Tensor | np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles with linear interpolation between order statistics (``torch.quantile``'s
    default); NaN for an empty input. Selection, not a full sort: ``numpy.partition`` on
    the CPU (or a numpy array), one ``torch.sort`` elsewhere."""
    n = values.size if isinstance(values, np.ndarray) else values.numel()
    if n == 0:
        return [math.nan] * len(qs)
    ranks = []
    for q in qs:
        r = q * (n - 1)
        lo = int(math.floor(r))
        ranks.append((lo, min(lo + 1, n - 1), r - lo))
    kth = sorted({k for lo, hi, _ in ranks for k in (lo, hi)})
    if isinstance(values, np.ndarray):
        a = np.partition(values.reshape(-1), kth)
    elif values.device.type == "cpu":
        a = np.partition(values.reshape(-1).numpy(), kth)
    else:
        a = values.reshape(-1).sort().values.cpu().numpy()
    return [float(a[lo]) + (float(a[hi]) - float(a[lo])) * w for lo, hi, w in ranks]


def stack_scalars(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack 0-d tensors into a float64 vector (one conversion when dtypes agree)."""
    if all(x.dtype == xs[0].dtype for x in xs):
        return torch.stack(list(xs)).double()
    return torch.stack([x.double() for x in xs])




# --------------------------------------------------------------------------------------
# Statistics as pure functions of tensors, accumulated on the device.
#
# A recorded step is turned into *partial* statistics (sums, maxima, per-rank values, a
# coordinate sample) held as device tensors in a :class:`Partials`. ``Partials.pack``
# lays them out in one float64 vector; under torch.distributed the vectors of all ranks
# are gathered (a collective, not a host sync); the host reads the (stacked) vectors of
# many steps in one transfer when the store is flushed, and :func:`finish` turns one
# step's rows (one per rank) into ``{name: float}``. Sums over ranks are exact for
# sharded tensors (FSDP2: every rank holds a disjoint shard); a replicated tensor (DDP)
# is counted on rank 0 only (``weight`` 0 elsewhere), so the stored numbers equal those
# of one process holding the whole model.
# --------------------------------------------------------------------------------------


@dataclass
class AdamTensor:
    r"""Adam's quantities for one parameter tensor (or its local shard), framework-free.

    Attributes:
        grad: the gradient :math:`g_t` of this step.
        v: the second moment Adam divides by, not bias-corrected (``max_exp_avg_sq``
            under AMSGrad).
        step: the step count :math:`t` after this step (a number, or a CPU tensor; see
            :func:`host_steps` for counters kept on the device).
        hyper: the group's normalised hyperparameters (``kind == "adam"``).
        exp_avg_sq: under AMSGrad, the running :math:`v` (for ``amsgrad_gap``).
        eff: the optimizer's own effective step (e.g. AdamAtan2), overriding the formula.
    """

    grad: torch.Tensor
    v: torch.Tensor
    step: int | float | torch.Tensor
    hyper: inspect.GroupHyper
    exp_avg_sq: torch.Tensor | None = None
    eff: torch.Tensor | None = None


@dataclass
class StepTensors:
    """Everything one recorded step contributes, as local tensors (no optimizer object).

    ``grads``, ``weights`` and the lists in ``detail`` are aligned with the recorder's
    tensor names; a ``None`` gradient or Adam entry means "not present this step".

    Attributes:
        loss: this rank's loss (tensor or float) or ``None``.
        grads: per-tensor gradients (local shards).
        param_sq: per-tensor :math:`\\|\\theta_t\\|^2` before the step (detail steps).
        neg_update: per-tensor :math:`\\theta_t - \\theta_{t+1}` (detail steps).
        adam: per-tensor :class:`AdamTensor` (detail steps, Adam family).
    """

    loss: torch.Tensor | float | None
    grads: list[torch.Tensor | None]
    param_sq: list[torch.Tensor] | None = None
    neg_update: list[torch.Tensor | None] | None = None
    adam: list[AdamTensor | None] | None = None


@dataclass
class Partials:
    """Partial statistics of one step on the device: ``sum``/``max`` entries are reduced
    over ranks with that operation, ``rank`` entries are kept per rank, ``sample`` is
    concatenated over ranks."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    maxs: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: torch.Tensor | None = None

    def pack(self, sample_cap: int, device: torch.device) -> tuple[tuple, torch.Tensor]:
        """``(layout, vector)``: all entries in one float64 vector on ``device``; the sample
        is padded to ``sample_cap`` entries after its length. ``layout`` is hashable and
        identical on every rank for the same kind of step."""
        parts: list[torch.Tensor] = []
        layout: list[tuple[str, str, int]] = []
        for op, d in (("sum", self.sums), ("max", self.maxs), ("rank", self.ranks)):
            for k, v in d.items():
                v = v.reshape(-1).to(device=device, dtype=torch.float64)
                layout.append((k, op, v.numel()))
                parts.append(v)
        cap = sample_cap if self.sample is not None else 0
        if cap:
            smp = self.sample.reshape(-1).to(device=device, dtype=torch.float64)[:cap]
            pad = torch.zeros(cap - smp.numel(), dtype=torch.float64, device=device)
            n = torch.full((1,), float(smp.numel()), dtype=torch.float64, device=device)
            parts += [n, smp, pad]
        vec = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        return (tuple(layout), cap), vec


def _vec(xs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([x.reshape(()).to(device=device, dtype=torch.float64) for x in xs])


def grad_partials(
    part: Partials,
    grads: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    device: torch.device,
) -> None:
    r"""``grad_sq`` (:math:`\|g\|^2` per tensor) and ``grad_bad`` (non-finite entries per
    tensor); a missing gradient counts 0.

    One fused norm over the gradients. Non-finite entries are counted only in tensors whose
    norm is not finite: on the CPU that is known at once (reading a CPU tensor is no device
    sync) and costs nothing on a finite step; on an accelerator every tensor is counted on
    the device rather than synchronising to find out.
    """
    n = len(grads)
    sq = torch.zeros(n, dtype=torch.float64, device=device)
    bad = torch.zeros(n, dtype=torch.float64, device=device)
    part.sums["grad_sq"], part.sums["grad_bad"] = sq, bad
    live = [i for i, g in enumerate(grads) if g is not None and g.numel() > 0 and weights[i]]
    if not live:
        return
    gl = [grads[i] for i in live]
    norms = torch.stack([x.to(device) for x in torch._foreach_norm(gl)]).double()
    idx = _index(tuple(live), device)
    sq.index_copy_(0, idx, norms.square())
    if device.type == "cpu":
        if _cpu_read(torch.isfinite(norms).all()):
            return
        which = [j for j, ok in enumerate(_cpu_read(torch.isfinite(norms))) if not ok]
    else:
        which = range(len(gl))
    for j in which:
        g = gl[j]
        bad[live[j]] = (g.numel() - torch.count_nonzero(torch.isfinite(g))).double()


_INDEX: dict[tuple, torch.Tensor] = {}


def _index(live: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached index tensor on ``device`` (built once per set of live tensors)."""
    key = (live, str(device))
    idx = _INDEX.get(key)
    if idx is None:
        if len(_INDEX) > 64:
            _INDEX.clear()
        idx = _INDEX[key] = torch.tensor(live, dtype=torch.long, device=device)
    return idx


def _cpu_read(x: torch.Tensor):
    """A CPU tensor's value on the host: host memory already, no device sync."""
    assert x.device.type == "cpu"
    return x.tolist()


def update_partials(
    part: Partials,
    param_sq: Sequence[torch.Tensor],
    neg_update: Sequence[torch.Tensor | None],
    grads: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    device: torch.device,
) -> None:
    r"""``param_sq`` :math:`\|\theta_t\|^2`, ``upd_sq`` :math:`\|u\|^2` and ``dot``
    :math:`\langle\theta_t-\theta_{t+1}, g\rangle` per tensor (:math:`u=\theta_{t+1}-\theta_t`)."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    n = len(neg_update)
    upd, dot = [zero] * n, [zero] * n
    live = [i for i in range(n)
            if neg_update[i] is not None and neg_update[i].numel() > 0 and weights[i]]
    norms = torch._foreach_norm([neg_update[i] for i in live]) if live else []
    for i, nrm in zip(live, norms, strict=True):
        w = weights[i]
        upd[i] = nrm.double().square() * w
        g = grads[i]
        if g is not None:
            dot[i] = torch.dot(neg_update[i].reshape(-1), g.reshape(-1)).double() * w
    part.sums["param_sq"] = _vec([x * w for x, w in zip(param_sq, weights, strict=True)], device)
    part.sums["upd_sq"] = _vec(upd, device)
    part.sums["dot"] = _vec(dot, device)


def adam_partials(
    part: Partials,
    tensors: Sequence[AdamTensor | None],
    weights: Sequence[float],
    sample: CoordinateSample,
    device: torch.device,
    scratch: Scratch | None = None,
) -> None:
    r"""Per-tensor partial Adam statistics (module docstring), on the device.

    ``adam_n`` (coordinates with state), ``eps_cnt`` (:math:`\#\{\sqrt{\hat v}<\epsilon_t\}`),
    ``g2v_sum`` (:math:`\sum_i g_i^2/\max(\hat v_i,\epsilon_t^2)`) and the AMSGrad gap's
    numerator/denominator are sums; ``eff_max`` and ``g2v_max`` maxima; the sampled
    effective steps form the sample. A ``None`` entry (no state, no gradient) is left out.
    """
    scratch = scratch if scratch is not None else Scratch()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    ninf = torch.full((), -math.inf, dtype=torch.float64, device=device)
    k = len(tensors)
    n_, cnt, gsum = [zero] * k, [zero] * k, [zero] * k
    emax, gmax = [ninf] * k, [ninf] * k
    gap_num, gap_den = [], []
    samples: list[torch.Tensor] = []
    # under torch.distributed the packed layout must be the same on every rank: the gap's
    # entry is there when any tensor has AMSGrad state, counted here or not
    amsgrad = any(a is not None and a.exp_avg_sq is not None for a in tensors)
    for i, a in enumerate(tensors):
        if a is None or weights[i] == 0 or a.v.numel() == 0:
            continue
        h, v = a.hyper, a.v
        t = float(a.step)  # a CPU step counter is host memory: no device sync
        bc2 = F.bias_correction2(h.beta2, t)
        eps_t = inspect.epsilon_t(h, t)  # formulas.eps_t; eps-free modes add eps (0)
        if a.eff is not None:
            eff = a.eff
            samples.append(sample.take(i, eff).double())
            emax[i] = eff.max().double()
        else:
            kw = {"lr": h.lr, "beta1": h.beta1, "beta2": h.beta2, "eps": h.eps, "step": t,
                  "eps_mode": "tf" if h.eps_mode == "tf" else "torch"}
            samples.append(F.effective_step(sample.take(i, v).double(), **kw))
            emax[i] = F.effective_step(v.min().double(), **kw)  # decreasing in v
        # eps governs a coordinate when sqrt(v/bc2) < eps_t, i.e. v < eps_t^2 bc2
        lt = torch.lt(v, eps_t * eps_t * bc2, out=scratch.get("lt", v, torch.bool))
        cnt[i] = torch.count_nonzero(lt).double()
        n_[i] = torch.full((), float(v.numel()), dtype=torch.float64, device=device)
        r = F.g2v_ratio(a.grad, v, bc2, eps_t)  # StableAdamW's g^2 / max(v_hat, eps_t^2)
        gsum[i] = r.sum().double()  # float32 accumulation is pairwise: ~1e-7 relative
        gmax[i] = r.max().double()
        if a.exp_avg_sq is not None:
            gap_num.append((v - a.exp_avg_sq).sum(dtype=torch.float64))
            gap_den.append(v.sum(dtype=torch.float64))
    if not any(x is not None for x in tensors):
        return
    part.sums["adam_n"] = _vec(n_, device)
    part.sums["eps_cnt"] = _vec(cnt, device)
    part.sums["g2v_sum"] = _vec(gsum, device)
    part.maxs["eff_max"] = _vec(emax, device)
    part.maxs["g2v_max"] = _vec(gmax, device)
    if amsgrad:
        part.sums["gap"] = torch.stack([torch.stack(gap_num or [zero]).sum(),
                                        torch.stack(gap_den or [zero]).sum()])
    part.sample = (
        torch.cat([x.reshape(-1).to(device) for x in samples])
        if samples
        else torch.zeros(0, dtype=torch.float64, device=device)
    )


def partials(
    st: StepTensors,
    weights: Sequence[float],
    device: torch.device,
    *,
    sample: CoordinateSample | None = None,
    scratch: Scratch | None = None,
) -> Partials:
    """All partial statistics of one step (:class:`StepTensors` in, device tensors out)."""
    part = Partials()
    loss = st.loss
    if loss is not None:
        lt = (
            loss.detach().reshape(()).to(device=device, dtype=torch.float64)
            if isinstance(loss, torch.Tensor)
            else torch.tensor(float(loss), dtype=torch.float64, device=device)
        )
        part.ranks["loss"] = lt
    grad_partials(part, st.grads, weights, device)
    if st.neg_update is not None and st.param_sq is not None:
        update_partials(part, st.param_sq, st.neg_update, st.grads, weights, device)
    if st.adam is not None and sample is not None:
        adam_partials(part, st.adam, weights, sample, device, scratch)
    return part


def unpack(layout: tuple, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reduce the gathered rows of one step (``rows``: ranks x packed length, on the host):
    ``{key: value}`` (sums summed, maxima maxed, ``rank`` entries as a per-rank array) and
    the concatenated sample."""
    entries, cap = layout
    out: dict[str, np.ndarray] = {}
    pos = 0
    for key, op, n in entries:
        block = rows[:, pos : pos + n]
        pos += n
        if op == "sum":
            out[key] = block.sum(axis=0)
        elif op == "max":
            out[key] = block.max(axis=0)
        else:
            out[key] = block[:, 0] if n == 1 else block
    sample = np.zeros(0)
    if cap:
        lens = rows[:, pos].astype(np.int64)
        sample = np.concatenate([rows[r, pos + 1 : pos + 1 + lens[r]] for r in range(len(rows))])
    return out, sample


def finish(
    red: dict[str, np.ndarray],
    sample: np.ndarray,
    names: Sequence[str],
    *,
    top_k: int = 0,
    per_tensor: bool = False,
) -> tuple[dict[str, float], dict[str, int], list[int]]:
    """Metrics from one step's reduced partials: ``(metrics, bad, ranks)``.

    ``bad``: non-finite gradient entries per tensor name; ``ranks``: the ranks whose own
    loss was non-finite. ``per_tensor`` adds ``grad_norm/<name>`` for every tensor and the
    ``top_k`` worst tensors' statistics (detail steps). With several ranks, ``loss`` is the
    mean of the per-rank losses (as DDP averages gradients) and ``loss_spread`` their
    range (max - min).
    """
    out: dict[str, float] = {}
    ranks: list[int] = []
    if "loss" in red:
        per_rank = np.atleast_1d(red["loss"])
        out[N.LOSS] = float(per_rank.mean())
        if per_rank.size > 1:
            ranks = [r for r, x in enumerate(per_rank.tolist()) if not math.isfinite(x)]
            if not ranks:
                out[N.LOSS_SPREAD] = float(per_rank.max() - per_rank.min())
    if "secant" in red:  # telemetry.secant: its six sums over every rank's tensors; q is
        # NaN when nothing moved (or nothing was measured): not recorded
        q, c = _cpu_read(from_parts(torch.from_numpy(np.ravel(red["secant"]).astype(
            np.float64))))
        if math.isfinite(q):
            out[N.SECANT], out[N.SECANT_COS] = q, c
    gsq, gbad = red["grad_sq"], red["grad_bad"]
    bad = {names[i]: int(c) for i, c in enumerate(gbad.tolist()) if c > 0}
    if gsq.size:
        out[N.GRAD_NORM] = math.sqrt(float(gsq.sum()))
        out[N.GRAD_NONFINITE] = float(gbad.sum())
        if per_tensor:
            for name, x in zip(names, np.sqrt(gsq).tolist(), strict=True):
                out[f"{N.GRAD_NORM}/{name}"] = x
    if "upd_sq" in red:
        p2, u2 = red["param_sq"], red["upd_sq"]
        p_norm, u_norm = math.sqrt(float(p2.sum())), math.sqrt(float(u2.sum()))
        g_norm = math.sqrt(float(gsq.sum())) if gsq.size else 0.0
        out[N.PARAM_NORM] = p_norm
        out[N.UPDATE_NORM] = u_norm
        if p_norm > 0:
            out[N.UPDATE_RATIO] = u_norm / p_norm
        if u_norm > 0 and g_norm > 0:
            out[N.UPDATE_COS] = float(red["dot"].sum()) / (u_norm * g_norm)
        if top_k > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = (np.sqrt(u2) / np.sqrt(p2)).tolist()
            order = sorted(
                (i for i, r in enumerate(ratios) if math.isfinite(r)), key=lambda i: -ratios[i]
            )
            for i in order[:top_k]:
                out[f"{N.UPDATE_RATIO}/{names[i]}"] = ratios[i]
    if "adam_n" in red and red["adam_n"].sum() > 0:
        n, cnt, gs = red["adam_n"], red["eps_cnt"], red["g2v_sum"]
        emax, gmax = red["eff_max"], red["g2v_max"]
        have = n > 0
        total = float(n.sum())
        qv = quantiles(sample, [q for q, _ in QUANTILES])
        for (_, key), val in zip(QUANTILES, qv, strict=True):
            out[key] = val
        out[N.EFF_STEP_MAX] = float(emax[have].max())
        out[N.EPS_SHARE] = float(cnt.sum()) / total
        out[N.G2V_RMS] = math.sqrt(float(gs.sum()) / total)
        out[N.G2V_MAX] = float(gmax[have].max())
        if "gap" in red:
            num, den = red["gap"].tolist()
            out[N.AMSGRAD_GAP] = num / den if den > 0 else 0.0
        if top_k > 0:
            idx = [i for i in range(len(n)) if have[i]]
            e = emax.tolist()
            for i in sorted(idx, key=lambda i: -e[i] if math.isfinite(e[i]) else -math.inf)[:top_k]:
                out[f"{N.EFF_STEP_MAX}/{names[i]}"] = e[i]
                out[f"{N.EPS_SHARE}/{names[i]}"] = float(cnt[i] / n[i])
                out[f"{N.G2V_RMS}/{names[i]}"] = math.sqrt(float(gs[i] / n[i]))
    return out, bad, ranks


def step_stats(
    st: StepTensors,
    names: Sequence[str],
    *,
    sample: CoordinateSample | None = None,
    top_k: int = 0,
    scratch: Scratch | None = None,
) -> dict[str, float]:
    """One process's statistics of one step, read to the host now (one transfer): the
    pure-function form of what the Monitor records (:func:`partials` then :func:`finish`)."""
    dev = _device_of(st)
    part = partials(st, [1.0] * len(names), dev, sample=sample, scratch=scratch)
    cap = part.sample.numel() if part.sample is not None else 0
    layout, vec = part.pack(cap, dev)
    red, smp = unpack(layout, to_host(vec).reshape(1, -1))
    return finish(red, smp, names, top_k=top_k, per_tensor=st.neg_update is not None)[0]


def _device_of(st: StepTensors) -> torch.device:
    for g in st.grads:
        if g is not None:
            return g.device
    if isinstance(st.loss, torch.Tensor):
        return st.loss.device
    return torch.device("cpu")


def host_steps(tensors: Sequence[AdamTensor | None]) -> None:
    """Replace step counters kept on an accelerator (``fused=True``/``capturable=True``
    optimizers) by numbers, read in one transfer for all tensors; CPU counters (torch's
    default) are left as they are (reading them is no device sync)."""
    on_dev = [a for a in tensors if a is not None and isinstance(a.step, torch.Tensor)
              and a.step.device.type != "cpu"]
    if on_dev:
        vals = to_host(torch.stack([a.step.reshape(()).double() for a in on_dev]))
        for a, v in zip(on_dev, vals.tolist(), strict=True):
            a.step = v


#: Number of device-to-host transfers of statistics made by the telemetry (for tests).
HOST_TRANSFERS = [0]


def to_host(x: torch.Tensor) -> np.ndarray:
    """The one place the telemetry moves statistics to the host (counted in
    :data:`HOST_TRANSFERS`)."""
    HOST_TRANSFERS[0] += 1
    return x.detach().to("cpu").numpy()


# -------------------------------------------------------------- optimizer-object adapters


def adam_tensors(
    optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor, dict]]
) -> list[AdamTensor | None]:
    """:class:`AdamTensor` per ``(name, p, group)`` read from a torch optimizer's state
    (``None`` where there is no Adam state or gradient)."""
    own = callable(getattr(optimizer, "effective_step", None))
    hypers: dict[int, inspect.GroupHyper] = {}
    out: list[AdamTensor | None] = []
    for _, p, group in params:
        h = hypers.get(id(group))
        if h is None:
            h = hypers[id(group)] = inspect.group_hyper(optimizer, group)
        state = optimizer.state.get(p, {})
        v = inspect.second_moment(optimizer, p, h.amsgrad) if h.kind == "adam" else None
        if v is None or p.grad is None or "step" not in state:
            out.append(None)
            continue
        raw = state.get("exp_avg_sq") if h.amsgrad and "max_exp_avg_sq" in state else None
        eff = inspect.effective_step(optimizer, p, group) if own else None
        out.append(AdamTensor(p.grad.detach(), v, state["step"], h, raw, eff))
    return out


def adam_state_stats(
    optimizer: torch.optim.Optimizer,
    params: Sequence[tuple[str, torch.Tensor, dict]],
    sample: CoordinateSample,
    *,
    top_k: int = 0,
    scratch: Scratch | None = None,
) -> dict[str, float]:
    """Adam statistics (module docstring) over ``params = [(name, p, group)]`` of one
    process, read to the host now. Kept for callers holding an optimizer object; new code
    passes tensors (:class:`AdamTensor`, :func:`partials`, :class:`~stablestep.telemetry.
    recorder.Recorder`)."""
    tensors = adam_tensors(optimizer, params)
    if not any(a is not None for a in tensors):
        return {}
    dev = next(a.v.device for a in tensors if a is not None)
    part = Partials()
    adam_partials(part, tensors, [1.0] * len(tensors), sample, dev, scratch)
    layout, vec = part.pack(part.sample.numel(), dev)
    red, smp = unpack(layout, to_host(vec).reshape(1, -1))
    red["grad_sq"] = red["grad_bad"] = np.zeros(0)
    out, _, _ = finish(red, smp, [n for n, _, _ in params], top_k=top_k)
    return out


def update_stats(
    names: Sequence[str],
    neg_update: Sequence[torch.Tensor],
    param_norms: Sequence[torch.Tensor],
    grad_norms: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    top_k: int = 0,
) -> dict[str, float]:
    r"""``param_norm``, ``update_norm``, ``update_ratio``, ``update_cos`` of one process
    (module docstring), read to the host now. ``neg_update``: :math:`\theta_t-\theta_{t+1}`
    per tensor; ``param_norms`` / ``grad_norms``: per-tensor norms of :math:`\theta_t` and
    :math:`g_t`. With ``top_k > 0``, ``update_ratio/<name>`` for the worst tensors."""
    if not neg_update:
        return {}
    dev = neg_update[0].device
    part = Partials()
    ones = [1.0] * len(names)
    update_partials(part, [x.double().square() for x in param_norms], neg_update, grads, ones, dev)
    part.sums["grad_sq"] = _vec([x.double().square() for x in grad_norms], dev)
    part.sums["grad_bad"] = torch.zeros(len(names), dtype=torch.float64, device=dev)
    layout, vec = part.pack(0, dev)
    red, smp = unpack(layout, to_host(vec).reshape(1, -1))
    out, _, _ = finish(red, smp, names, top_k=top_k)
    for k in (N.GRAD_NORM, N.GRAD_NONFINITE):
        out.pop(k, None)
    return out
