r"""Model probes: what the transformer itself does, read through forward hooks.

Opt-in and cheap: ``Monitor(model, opt, model_probes=ModelProbes(model, optimizer=opt))``
(or ``monitor.attach_model_probes(...)``). The hooks stay idle (one Python call per
module per forward) except on the steps the Monitor records in detail (every
``state_every`` steps, default 10), when they compute, with no host sync until the
Monitor's own one:

* ``attn_logit_max/<module>``: the largest attention logit
  :math:`\max_{h,i,j\le i} q_{h,i}\cdot k_{h,j}\,s` (:math:`s` the module's scale, usually
  :math:`1/\sqrt{d_h}`; causal or given masks applied), and ``attn_logit_max`` over layers;
* ``attn_entropy/<module>``: the mean over batch, heads and queries of the attention
  entropy :math:`-\sum_j p_{ij}\ln p_{ij}` (nats), and ``attn_entropy_min`` over layers;
* ``lm_logz`` / ``lm_logz_absmax``: the mean and the largest :math:`|\cdot|` of the LM head's
  :math:`\log Z = \mathrm{logsumexp}_v\, z_v` per position (z-loss drives it to 0);
* ``act_rms/<block>`` and ``act_rms_max``: :math:`\sqrt{\overline{x^2}}` of each block's output.

Optimizer side (read in :meth:`ModelProbes.collect`, i.e. at ``monitor.observe``, after the
backward pass):

* ``grad_rms`` (all coordinates), ``eps_grad_ratio``: :math:`\epsilon_t` over the median
  of the per-tensor gradient RMS, ``eps_grad_ratio_max`` over tensors, and
  ``eps_grad_ratio/<tensor>`` for the ``top_k`` largest; :math:`\epsilon_t` in PyTorch's
  convention at the step about to be applied (:func:`stablestep.formulas.eps_t` through
  :func:`stablestep.optim.inspect.epsilon_t`: TF/Keras' epsilon hat
  :math:`\hat\epsilon` counts as :math:`\hat\epsilon/\sqrt{1-b_2^t}`). Above 1, eps, not
  :math:`\sqrt{\hat v}`, sets the step of a typical coordinate (Everett et al. 2024);
* ``loss_scale`` and ``skipped_steps`` (cumulative) of a ``torch.amp.GradScaler``:
  a step is counted as skipped when the scale went down since the previous
  ``observe`` (the scaler halves it exactly on the steps it skips). Counted on every
  step on the device, read on the cadence: no extra host sync.

The cosine between update and gradient is the Monitor's own ``update_cos``.

Which modules are attention (found automatically):

* ``torch.nn.MultiheadAttention`` (self- or cross-attention, ``attn_mask``,
  ``key_padding_mask`` and ``is_causal`` honoured);
* Hugging Face GPT-2 attention (a module with ``c_attn``, ``num_heads``, ``head_dim``;
  causal; padding masks are not applied);
* LLaMA-family attention (``q_proj``/``k_proj``, optional ``q_norm``/``k_norm`` as in
  Qwen3/OLMo2, rotary ``position_embeddings=(cos, sin)``, grouped-query heads);
* any module with a method ``qk(*args, **kwargs) -> (q, k)`` taking its own forward
  arguments and returning ``(batch, heads, tokens, head_dim)`` tensors (optional
  attributes ``qk_scale`` and ``qk_causal``, default :math:`1/\sqrt{d_h}` and ``True``);
* any module named in ``attention={"blocks.0.attn": fn}`` with
  ``fn(module, args, kwargs) -> (q, k)`` (same shapes), e.g. for a fused kernel.

The LM head is ``model.get_output_embeddings()`` (Hugging Face), else a module called
``lm_head``, else the one named by ``lm_head=``; the blocks are the longest
``nn.ModuleList`` (``transformer.h``, ``model.layers``, ``blocks``) or ``blocks=``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from stablestep.telemetry import names as N

log = logging.getLogger("stablestep.telemetry.model_probes")

QKFn = Callable[[nn.Module, tuple, dict], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------ q and k, per family
def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(-3, -2)


def _mha_qk(m: nn.MultiheadAttention, args: tuple, kwargs: dict):
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e: 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq = bk = None
    if m.in_proj_bias is not None:
        bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e: 2 * e]
    q = nn.functional.linear(query, wq, bq)
    k = nn.functional.linear(key, wk, bk)
    return _split_heads(q, e // h), _split_heads(k, e // h)


def _mha_mask(m: nn.MultiheadAttention, args: tuple, kwargs: dict, tq: int, tk: int
              ) -> torch.Tensor | None:
    """Allowed (True) positions ``(B or 1, H or 1, Tq, Tk)`` from the module's masks."""
    allowed = None
    am = args[4] if len(args) > 4 else kwargs.get("attn_mask")
    kpm = args[2] if len(args) > 3 else kwargs.get("key_padding_mask")
    if kwargs.get("is_causal") and am is None:
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril()
    if am is not None:
        a = ~am if am.dtype == torch.bool else torch.isfinite(am) & (am > -1e30)
        if a.dim() == 3:  # (B*H, Tq, Tk)
            a = a.view(-1, m.num_heads, tq, tk)
        allowed = a
    if kpm is not None:
        k_ok = ~kpm if kpm.dtype == torch.bool else torch.isfinite(kpm) & (kpm > -1e30)
        k_ok = k_ok[:, None, None, :]
        allowed = k_ok if allowed is None else allowed & k_ok
    return allowed


def _gpt2_qk(m: nn.Module, args: tuple, kwargs: dict):
    h = args[0] if args else kwargs["hidden_states"]
    q, k, _ = m.c_attn(h).split(m.split_size, dim=-1)
    return _split_heads(q, m.head_dim), _split_heads(k, m.head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _llama_qk(m: nn.Module, args: tuple, kwargs: dict):
    h = args[0] if args else kwargs["hidden_states"]
    d = m.head_dim
    q, k = m.q_proj(h), m.k_proj(h)
    for name in ("q_norm", "k_norm"):
        norm = getattr(m, name, None)
        if norm is None:
            continue
        x = q if name == "q_norm" else k
        w = getattr(norm, "weight", None)
        per_head = w is not None and w.shape[-1] == d
        x = norm(x.view(*x.shape[:-1], -1, d)).flatten(-2) if per_head else norm(x)
        q, k = (x, k) if name == "q_norm" else (q, x)
    q, k = _split_heads(q, d), _split_heads(k, d)
    pe = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
    if pe is not None:
        cos, sin = (t.unsqueeze(1) for t in pe)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
    return q, k


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if callable(getattr(m, "qk", None)):
        return "qk"
    if hasattr(m, "c_attn") and hasattr(m, "head_dim") and hasattr(m, "split_size"):
        return "gpt2"
    if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim"):
        return "llama"
    return None


def attention_stats(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                    causal: bool = True, allowed: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Max logit and mean entropy of attention ``softmax(q k^T s)`` (pure function).

    ``q``: ``(..., Tq, D)``, ``k``: ``(..., Tk, D)``; ``s = scale`` or :math:`1/\sqrt D`;
    ``causal`` keeps :math:`j \le i + (T_k - T_q)`; ``allowed`` (broadcastable boolean)
    further restricts the keys. Returns 0-d float32 tensors
    :math:`\max_{ij} \ell_{ij}` and :math:`\overline{-\sum_j p_{ij}\ln p_{ij}}`
    (rows with no allowed key are left out).
    """
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * s
    tq, tk = logits.shape[-2:]
    mask = None
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=logits.device).tril(tk - tq)
    if allowed is not None:
        mask = allowed if mask is None else mask & allowed
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    lmax = logits.amax()
    p = torch.softmax(logits, dim=-1)
    ent = torch.special.entr(p).sum(-1)
    if allowed is not None:  # rows with no allowed key (padding) have no entropy
        ent = ent.masked_select(torch.isfinite(logits).any(-1))
    ent = ent.mean()
    return lmax, ent


class ModelProbes:
    """Forward hooks on a model's attention, LM head and blocks (module docstring).

    Args:
        model: the ``nn.Module`` (any wrapper whose submodules are the real ones; DDP's
            ``.module`` is unwrapped).
        optimizer: read for eps (``eps_grad_ratio``) and gradients; ``None``: skip.
        scaler: a ``torch.amp.GradScaler`` (``loss_scale``, ``skipped_steps``).
        attention: ``{module name: fn(module, args, kwargs) -> (q, k)}`` for attention
            modules not found automatically; ``False`` turns attention probes off.
        lm_head: name of the output-logit module (default: found, see module docstring);
            ``False``: off.
        blocks: name of the ``nn.ModuleList`` of blocks; ``False``: off.
        every: record every ``every`` steps (``None``: the Monitor's ``state_every``).
        max_batch: use at most this many sequences of the batch for the attention
            probes (``None``: all).
        top_k: per-tensor ``eps_grad_ratio`` for the ``top_k`` largest.
    """

    def __init__(self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                 scaler: Any = None, attention: dict[str, QKFn] | bool | None = None,
                 lm_head: str | bool | None = None, blocks: str | bool | None = None,
                 every: int | None = None, max_batch: int | None = None, top_k: int = 3):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"Invalid every: {every!r} (an int >= 1 or None)")
        model = getattr(model, "module", model) if isinstance(
            getattr(model, "module", None), nn.Module) else model
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.every, self.max_batch, self.top_k = every, max_batch, top_k
        self._armed = True  # the first step is always recorded
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self.last: dict[str, float] = {}
        self._prev_scale: torch.Tensor | None = None
        self._skips: torch.Tensor | None = None
        self._skipped_base = 0
        self._pnames: dict[int, str] | None = None
        named = dict(model.named_modules())
        self.attention: list[str] = []
        if attention is not False:
            custom = dict(attention or {})
            for name, fn in custom.items():
                if name not in named:
                    raise ValueError(f"attention module {name!r} not found in the model")
                self._hook_attention(name, named[name], fn)
            for name, m in named.items():
                if name in custom or any(name.startswith(a + ".") for a in self.attention):
                    continue
                if _kind(m) is not None:
                    self._hook_attention(name, m, None)
        self.lm_head = None
        if lm_head is not False:
            self.lm_head = self._find_lm_head(model, named, lm_head)
            if self.lm_head is not None:
                self._handles.append(named[self.lm_head].register_forward_hook(self._logz_hook))
        self.blocks: list[str] = []
        if blocks is not False:
            for name in self._find_blocks(named, blocks):
                self.blocks.append(name)
                self._handles.append(named[name].register_forward_hook(self._rms_hook(name)))
        log.debug("model probes: attention %s, lm_head %s, blocks %s",
                  self.attention, self.lm_head, self.blocks)

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _find_lm_head(model: nn.Module, named: dict, lm_head: str | None) -> str | None:
        if isinstance(lm_head, str):
            if lm_head not in named:
                raise ValueError(f"lm_head module {lm_head!r} not found in the model")
            return lm_head
        get = getattr(model, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if isinstance(out, nn.Module):
            for name, m in named.items():
                if m is out:
                    return name
        return "lm_head" if "lm_head" in named else None

    @staticmethod
    def _find_blocks(named: dict, blocks: str | None) -> list[str]:
        if isinstance(blocks, str):
            if not isinstance(named.get(blocks), nn.ModuleList):
                raise ValueError(f"blocks {blocks!r} is not an nn.ModuleList of the model")
            best = blocks
        else:
            lists = [(len(m), n) for n, m in named.items()
                     if isinstance(m, nn.ModuleList) and len(m)
                     and len({type(c) for c in m}) == 1]
            if not lists:
                return []
            best = max(lists, key=lambda x: (x[0], -len(x[1])))[1]
        return [f"{best}.{i}" if best else str(i) for i in range(len(named[best]))]

    def _hook_attention(self, name: str, m: nn.Module, fn: QKFn | None) -> None:
        self.attention.append(name)
        self._handles.append(m.register_forward_pre_hook(self._attn_hook(name, m, fn),
                                                         with_kwargs=True))

    # ------------------------------------------------------------------ hooks
    def _attn_hook(self, name: str, m: nn.Module, fn: QKFn | None):
        kind = "custom" if fn is not None else _kind(m)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._armed:
                return
            with torch.no_grad():
                allowed, causal, scale = None, True, None
                if kind == "custom":
                    q, k = fn(module, args, kwargs)
                elif kind == "qk":
                    q, k = module.qk(*args, **kwargs)
                    scale = getattr(module, "qk_scale", None)
                    causal = bool(getattr(module, "qk_causal", True))
                elif kind == "mha":
                    q, k = _mha_qk(module, args, kwargs)
                    causal = False
                    allowed = _mha_mask(module, args, kwargs, q.shape[-2], k.shape[-2])
                elif kind == "gpt2":
                    q, k = _gpt2_qk(module, args, kwargs)
                    scale = getattr(module, "scaling", None)
                    if scale is None:
                        scale = module.head_dim ** -0.5 if module.scale_attn_weights else 1.0
                else:
                    q, k = _llama_qk(module, args, kwargs)
                    scale = getattr(module, "scaling", None)
                if self.max_batch is not None and q.dim() == 4:
                    q, k = q[: self.max_batch], k[: self.max_batch]
                    if allowed is not None and allowed.dim() == 4 and allowed.shape[0] > 1:
                        allowed = allowed[: self.max_batch]
                lmax, ent = attention_stats(q, k, scale=scale, causal=causal, allowed=allowed)
            self._pending.setdefault(f"{N.ATTN_LOGIT_MAX}/{name}", []).append(lmax)
            self._pending.setdefault(f"{N.ATTN_ENTROPY}/{name}", []).append(ent)

        return hook

    def _logz_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not self._armed:
            return
        z = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
        with torch.no_grad():
            logz = torch.logsumexp(z.detach().float(), dim=-1)
            self._pending.setdefault(N.LM_LOGZ, []).append(logz.mean())
            self._pending.setdefault(N.LM_LOGZ_ABSMAX, []).append(logz.abs().amax())

    def _rms_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not self._armed:
                return
            x = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(x, torch.Tensor):
                return
            with torch.no_grad():
                rms = x.detach().float().square().mean().sqrt()
            self._pending.setdefault(f"{N.ACT_RMS}/{name}", []).append(rms)

        return hook

    # ------------------------------------------------------------------ the step
    def _scaler_tick(self) -> None:
        """Count a skipped step on the device when the scale went down (no host sync)."""
        sc = self.scaler
        if sc is None or not getattr(sc, "is_enabled", lambda: True)():
            return
        scale = getattr(sc, "_scale", None)
        if not isinstance(scale, torch.Tensor):
            return
        scale = scale.detach().reshape(()).clone()
        if self._prev_scale is not None:
            self._prev_scale = self._prev_scale.to(scale.device)
            down = (scale < self._prev_scale).to(torch.int64)
            self._skips = down if self._skips is None else self._skips + down
        self._prev_scale = scale

    def _optimizer_side(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        opt = self.optimizer
        if opt is None:
            return out
        if self._pnames is None:
            self._pnames = {id(p): n for n, p in self.model.named_parameters()}
        names = self._pnames
        grads, tnames, eps = [], [], []
        for group in opt.param_groups:
            e = group.get("eps")
            if isinstance(e, (tuple, list)):
                e = e[0]
            live = [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
            if not live:
                continue
            grads.extend(p.grad.detach() for p in live)
            tnames.extend(names.get(id(p), f"param{len(tnames) + i}") for i, p in
                          enumerate(live))
            if e is None:
                continue
            eps.extend([self._eps_t(opt, group, live[0], e)] * len(live))
        if not grads:
            return out
        # DTensor (FSDP2) gradients: the norm of a shard is completed across ranks
        norms = torch.stack([(n.full_tensor() if hasattr(n, "full_tensor") else n).float()
                             for n in torch._foreach_norm(grads)])
        numel = torch.tensor([g.numel() for g in grads], dtype=torch.float32,
                             device=norms.device)
        rms = norms / numel.sqrt()
        out[N.GRAD_RMS] = (norms.square().sum() / numel.sum()).sqrt()
        if len(eps) == len(grads):
            # a tensor with an all-zero gradient (unused this step) has no ratio
            ratio = torch.tensor(eps, dtype=torch.float32, device=norms.device) / rms
            ratio = torch.where(rms > 0, ratio, torch.full_like(ratio, math.nan))
            out[N.EPS_GRAD_RATIO] = ratio.nanmedian()
            out[N.EPS_GRAD_RATIO_MAX] = ratio.nan_to_num(-math.inf).amax()
            k = min(self.top_k, len(grads))
            if k:
                top = torch.topk(ratio.nan_to_num(-math.inf), k).indices.tolist()
                for i in top:
                    out[f"{N.EPS_GRAD_RATIO}/{tnames[i]}"] = ratio[i]
        return out

    @staticmethod
    def _eps_t(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, eps: Any) -> float:
        r"""The epsilon the group's next step adds to :math:`\sqrt{\hat v}`:
        :func:`stablestep.formulas.eps_t` (through :func:`stablestep.optim.inspect.epsilon_t`)
        in the group's convention at the step about to be applied, :math:`t + 1` for a
        state that has taken :math:`t` steps (``collect`` runs before ``optimizer.step()``).
        For TF's epsilon hat that is :math:`\hat\epsilon/\sqrt{1-b_2^{t+1}}`, not the raw
        ``eps``. An optimizer :mod:`~stablestep.optim.inspect` does not know: its raw eps."""
        from stablestep.optim import inspect

        try:
            hyper = inspect.group_hyper(opt, group)
        except (TypeError, ValueError, KeyError) as err:
            log.debug("eps_t: %s; using the raw eps", err)
            return float(eps)
        t = opt.state.get(p, {}).get("step", 0)
        t = float(t.item()) if isinstance(t, torch.Tensor) else float(t)
        if not math.isfinite(t):
            return float(eps)
        return inspect.epsilon_t(hyper, max(1, int(t) + 1))

    def collect(self, step: int | None = None) -> dict[str, float]:
        """The metrics gathered since the last call (one host sync), then arm the hooks
        for the next step if it is on the cadence. Call after ``loss.backward()``
        (``Monitor.observe`` does); ``step`` is the step just run."""
        self._scaler_tick()
        out: dict[str, float] = {}
        if self._armed:
            vals: dict[str, torch.Tensor] = {}
            for key, xs in self._pending.items():  # a module called twice: its extreme
                x = torch.stack(xs)
                if key == N.LM_LOGZ:
                    vals[key] = x.mean()
                elif key.startswith(N.ATTN_ENTROPY + "/"):
                    vals[key] = x.amin()
                else:
                    vals[key] = x.amax()
            vals.update(self._optimizer_side())
            if self.scaler is not None and isinstance(self._prev_scale, torch.Tensor):
                vals[N.LOSS_SCALE] = self._prev_scale.float()
                vals[N.SKIPPED_STEPS] = (self._skips if self._skips is not None
                                         else torch.zeros((), dtype=torch.int64))
            if vals:
                keys = list(vals)
                host = torch.stack([vals[k].double().cpu().reshape(()) for k in keys]).tolist()
                # a non-finite probe value (an overflowed logit) is left out: the loss
                # and gradients the Monitor checks are what mark a step non-finite
                out = {k: v for k, v in zip(keys, host, strict=True) if math.isfinite(v)}
                if N.SKIPPED_STEPS in out:
                    out[N.SKIPPED_STEPS] += self._skipped_base
                self._summarise(out)
        self._pending = {}
        every = self.every or 1
        nxt = (step + 1) if step is not None else None
        self._armed = nxt is None or nxt % every == 0
        if out:
            self.last = out
        return out

    @staticmethod
    def _summarise(out: dict[str, float]) -> None:
        for base, agg, key in ((N.ATTN_LOGIT_MAX, max, N.ATTN_LOGIT_MAX),
                               (N.ATTN_ENTROPY, min, N.ATTN_ENTROPY_MIN),
                               (N.ACT_RMS, max, N.ACT_RMS_MAX)):
            xs = [v for k, v in out.items() if k.startswith(base + "/") and math.isfinite(v)]
            if xs:
                out[key] = agg(xs)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The hooks record nothing inside this block (e.g. a replay of the step by
        :mod:`stablestep.telemetry.nan_origin`)."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed

    def bind(self, every: int | None) -> None:
        """Adopt the Monitor's cadence when none was given (called on attach)."""
        if self.every is None:
            self.every = every

    @property
    def skipped(self) -> int:
        """Steps the GradScaler skipped so far (a host sync)."""
        return self._skipped_base + (int(self._skips) if self._skips is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        """The skipped-step count and the last loss scale (to resume identically)."""
        return {"version": 1, "skipped": self.skipped,
                "prev_scale": None if self._prev_scale is None else float(self._prev_scale),
                "armed": self._armed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported ModelProbes state version: {state.get('version')!r}")
        self._skipped_base, self._skips = int(state["skipped"]), None
        ps = state.get("prev_scale")
        self._prev_scale = None if ps is None else torch.tensor(ps, dtype=torch.float32)
        self._armed = bool(state.get("armed", True))

    def remove(self) -> None:
        """Remove every hook (the model is left as it was)."""
        for h in self._handles:
            h.remove()
        self._handles = []
