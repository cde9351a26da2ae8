r"""A small GPT trained on real text: the Python standard library's own sources.

The text is read at run time from the interpreter's library directory
(``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file there, in sorted order,
concatenated as bytes (vocabulary 256, no tokenizer, no download) up to ``n_bytes``.
The model is a pre-LayerNorm GPT (:class:`TinyGPT`) with optional qk-layernorm (a
LayerNorm on each head's q and k before the dot product, Dehghani et al. 2023) and an
optional z-loss :math:`c\,(\log Z)^2` on the output logits (Wortsman et al. 2023,
arXiv 2309.14322; PaLM's default :math:`c = 10^{-4}`).

:func:`train_text` runs AdamW under an optional ``stablestep.Monitor`` with
:class:`stablestep.telemetry.model_probes.ModelProbes` attached, so the attention
logits, the output log Z and the activation RMS are recorded on the Monitor's cadence.

Checked on a 2-core CPU (2 layers, d 128, 4 heads, context 64, batch 16, AdamW
b2 0.95): the maximum attention logit reaches tens at lr 3e-3 and tens of thousands
at lr 1e-1 without qk-layernorm; with it, it stays near 20.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB = 256
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@lru_cache(maxsize=4)
def stdlib_bytes(n_bytes: int = 2_000_000, root: str | None = None) -> bytes:
    """The first ``n_bytes`` of the standard library's ``*.py`` sources, sorted by path
    (files under ``site-packages`` and test data excluded), read from ``root``
    (default ``sysconfig.get_paths()["stdlib"]``). Raises ``FileNotFoundError`` with a
    one-line message if the directory holds no Python sources (a stripped install)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = bytearray()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__",
                                                              "dist-packages"))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out += fh.read()
            except OSError:
                continue
            if len(out) >= n_bytes:
                return bytes(out[:n_bytes])
    if not out:
        raise FileNotFoundError(f"no Python sources under {root!r} to train on")
    return bytes(out)


@dataclass(frozen=True)
class TextConfig:
    """One text run: model (``n_layer``, ``d``, ``n_head``, ``ctx``, ``qk_norm``), data
    (``n_bytes``, ``batch``), AdamW (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``warmup`` linear warmup steps), ``z_loss`` coefficient (0: off), ``steps``, ``seed``,
    ``precision`` (``"fp32"``; ``"fp16"`` or ``"bf16"``: the activations between blocks and
    their gradients are stored in that format, see :class:`TinyGPT`; fp16 with a
    ``torch.amp.GradScaler``),
    ``logit_scale`` (multiplies the LM head's output: a crude stand-in for a wide model's
    large output logits), ``curvature_every`` (always 0: no curvature probe on text);
    ``problem``, ``optimizer``, ``amsgrad``, ``schedule`` describe the run to the lab's
    runner and report (AdamW, constant lr after ``warmup``)."""

    n_layer: int = 2
    d: int = 128
    n_head: int = 4
    ctx: int = 64
    batch: int = 16
    n_bytes: int = 2_000_000
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0
    qk_norm: bool = False
    z_loss: float = 0.0
    steps: int = 400
    seed: int = 0
    precision: str = "fp32"
    logit_scale: float = 1.0
    init_scale: float = 0.02
    curvature_every: int = 0
    problem: str = "stdlib-text"
    optimizer: str = "adamw"  # the lab's report tables read these three
    amsgrad: bool = False
    schedule: str = "constant"

    @property
    def n(self) -> int:
        """Training bytes (the report's data-size column)."""
        return self.n_bytes

    def __post_init__(self) -> None:
        if self.d % self.n_head:
            raise ValueError(f"d={self.d} is not a multiple of n_head={self.n_head}")
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}; "
                             f"got {self.precision!r}")
        for name in ("n_layer", "d", "n_head", "ctx", "batch", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields (stored as the run's config)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


class Attention(nn.Module):
    r"""Causal multi-head self-attention with optional qk-layernorm.

    Exposes ``qk(x) -> (q, k)`` of shape ``(B, H, T, D)`` after the optional norms:
    the protocol :class:`~stablestep.telemetry.model_probes.ModelProbes` uses to read
    the attention logits :math:`q\cdot k/\sqrt D` of any module."""

    def __init__(self, d: int, n_head: int, *, qk_norm: bool = False,
                 low: torch.dtype | None = None):
        super().__init__()
        self.n_head, self.head_dim, self.low = n_head, d // n_head, low
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None

    def _heads(self, x: torch.Tensor):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, H, T, D)`` for input ``x`` (after qk-layernorm)."""
        q, k, _ = self._heads(x)
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``x`` ``(B, T, d)``: softmax(q k^T / sqrt(D)) v, projected."""
        b, t, d = x.shape
        q, k, v = self._heads(x)
        if self.low is None:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the attention logits stored in the low-precision format (overflow -> inf)
            att = (q @ k.transpose(-1, -2) * self.head_dim**-0.5).to(self.low).float()
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = torch.softmax(att.masked_fill(~causal, -math.inf), dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a 4x GELU MLP, both residual."""

    def __init__(self, d: int, n_head: int, *, qk_norm: bool = False,
                 low: torch.dtype | None = None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, n_head, qk_norm=qk_norm, low=low)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + attn(ln1(x)), then + mlp(ln2(.))."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ScaledHead(nn.Linear):
    """The LM head: a bias-free linear layer whose output is multiplied by ``scale``, so the
    module's output *is* the model's logits (what the model probes read as log Z)."""

    def __init__(self, d: int, vocab: int, scale: float = 1.0):
        super().__init__(d, vocab, bias=False)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * x W^T``."""
        y = super().forward(x)
        return y * self.scale if self.scale != 1.0 else y


class TinyGPT(nn.Module):
    """A byte-level GPT: token + position embeddings, ``n_layer`` blocks, final LayerNorm,
    an untied ``lm_head`` whose output is multiplied by ``logit_scale``.

    Low precision is emulated where it overflows: with ``precision="fp16"``/``"bf16"``
    the residual stream is rounded to that format after the embedding and after every
    block (``x.to(fp16).float()``), and so are the attention logits; their values (and,
    through autograd, their gradients) saturate to inf beyond the format's range (65504
    for fp16) exactly as stored fp16 activations do; the matmuls stay fp32 because a CPU
    has no fast fp16 matmul (torch's CPU fp16 autocast runs this model about 40x slower)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d)
        self.pos = nn.Embedding(cfg.ctx, cfg.d)
        self.blocks = nn.ModuleList(
            Block(cfg.d, cfg.n_head, qk_norm=cfg.qk_norm, low=_DTYPES[cfg.precision])
            for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.lm_head = ScaledHead(cfg.d, VOCAB, cfg.logit_scale)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_scale)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-byte logits ``(B, T, 256)`` for byte ids ``idx`` ``(B, T)``."""
        t = idx.shape[1]
        low = _DTYPES[self.cfg.precision]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = x.to(low).float() if low is not None else x
        for blk in self.blocks:
            x = blk(x)
            x = x.to(low).float() if low is not None else x
        return self.lm_head(self.ln_f(x))


def text_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy and the loss to optimise: :math:`\mathrm{CE} + c\,\overline{(\log Z)^2}`
    with :math:`\log Z = \mathrm{logsumexp}` of each position's logits (the z-loss)."""
    logits = logits.float()
    ce = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    if not z_loss:
        return ce, ce
    logz = torch.logsumexp(logits, dim=-1)
    return ce, ce + z_loss * logz.square().mean()


@dataclass
class TextResult:
    """Outcome of one text run: ``losses[t]`` the batch cross-entropy (NaN where the step
    was not finite), ``final_loss`` the mean of the last 20 finite batch losses (NaN if
    diverged), ``diverged_at`` the first non-finite loss step (fp32) or ``None``,
    ``max_attn_logit`` the largest attention logit the probes saw, ``skipped`` the
    GradScaler's skipped steps (fp16)."""

    losses: np.ndarray
    final_loss: float
    diverged_at: int | None
    max_attn_logit: float
    skipped: int = 0
    probes: dict[str, float] | None = None


def batches(cfg: TextConfig, data: torch.Tensor, gen: torch.Generator):
    """Random windows of ``ctx + 1`` bytes: inputs and next-byte targets."""
    while True:
        i = torch.randint(len(data) - cfg.ctx - 1, (cfg.batch,), generator=gen)
        w = torch.stack([data[j: j + cfg.ctx + 1] for j in i.tolist()]).long()
        yield w[:, :-1], w[:, 1:]


def train_text(cfg: TextConfig, *, monitor: Any = None, probes: Any = None) -> TextResult:
    """Train ``cfg``; ``monitor(model, optimizer, probe_loss)`` may return a Monitor-like
    observer (as in :func:`stablestep.lab.train.train`). ``probes``: a
    ``ModelProbes`` factory ``model -> ModelProbes`` (default: one on the model, attached
    to the Monitor when it accepts ``model_probes``)."""
    from stablestep.telemetry.model_probes import ModelProbes

    torch.manual_seed(cfg.seed)
    data = torch.frombuffer(bytearray(stdlib_bytes(cfg.n_bytes)), dtype=torch.uint8)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    sched = None
    if cfg.warmup:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / cfg.warmup))
    fp16 = cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if fp16 else None
    mp = (probes or (lambda m: ModelProbes(m, optimizer=opt, scaler=scaler)))(model)
    obs = monitor(model, opt, None) if monitor is not None else None
    if obs is not None and hasattr(obs, "attach_model_probes"):
        obs.attach_model_probes(mp)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    it = batches(cfg, data, gen)
    losses = np.full(cfg.steps, np.nan)
    diverged_at = None
    peak = 0.0
    try:
        for t in range(cfg.steps):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            logits = model(x)  # 1. forward
            ce, loss = text_loss(logits, y, cfg.z_loss)
            if scaler is not None:
                scaler.scale(loss).backward()  # 2. backward
                scaler.unscale_(opt)
            else:
                loss.backward()
            if obs is not None:
                obs.observe(ce)  # 3. telemetry
            elif mp is not None:
                mp.collect()
            value = float(ce.detach())
            losses[t] = value
            peak = max(peak, mp.last.get("attn_logit_max", 0.0) if mp is not None else 0.0)
            if not math.isfinite(value) and scaler is None:
                diverged_at = t
                break
            if scaler is not None:
                scaler.step(opt)  # 4. update (skipped on inf/NaN gradients)
                scaler.update()
            else:
                opt.step()
            if sched is not None:
                sched.step()
    finally:
        if obs is not None:
            obs.close()
        if mp is not None:
            mp.remove()
    tail = losses[np.isfinite(losses)][-20:]
    final = float(tail.mean()) if diverged_at is None and tail.size else math.nan
    skipped = int(mp.skipped) if mp is not None else 0
    return TextResult(losses=losses, final_loss=final, diverged_at=diverged_at,
                      max_attn_logit=peak, skipped=skipped,
                      probes=dict(mp.last) if mp is not None else None)


def train_as_lab(cfg: TextConfig, *, monitor: Any = None):
    """:func:`train_text` returning the lab's :class:`~stablestep.lab.train.TrainResult`
    (what :func:`stablestep.lab.train.train` returns for the other scenarios)."""
    from stablestep.lab.train import TrainResult

    r = train_text(cfg, monitor=monitor)
    lrs = np.array([cfg.lr * (min(1.0, (t + 1) / cfg.warmup) if cfg.warmup else 1.0)
                    for t in range(cfg.steps)])
    diverged = r.diverged_at
    if diverged is None and cfg.precision == "fp16" and not np.isfinite(r.losses).all():
        diverged = int(np.flatnonzero(~np.isfinite(r.losses))[0])
    final = r.final_loss if diverged is None else math.nan
    return TrainResult(losses=r.losses, lrs=lrs, final_loss=final, diverged_at=diverged)


_ATTN = TextConfig(lr=1e-1, steps=60)
_LOGZ = TextConfig(lr=1e-2, qk_norm=True, logit_scale=10.0, steps=60)
#: the z-loss coefficient the diagnosis computes on the failing variant
#: (diagnosis.transformer.z_loss_coefficient at its measured log Z 24.8; tests/lab checks it)
LOGZ_FIX = 1e-2
_FP16 = TextConfig(lr=3e-1, precision="fp16", steps=50)
_EPS = TextConfig(lr=3e-3, eps=1e-1, steps=60)


def scenario(name: str):
    """The text scenario called ``name`` as a :class:`stablestep.lab.scenarios.Scenario`."""
    from dataclasses import replace

    from stablestep.lab.config import Variant
    from stablestep.lab.scenarios import Scenario

    if name == "attention-logit-growth":
        b = _ATTN
        return Scenario(
            name=name, seed="text", title="My transformer's loss plateaus and spikes at high lr",
            story=("A GPT trains at a high learning rate; the loss stalls above where a lower lr "
                   "gets and the run is fragile. Marin's 32B run only stopped spiking with "
                   "QK-norm; update clipping, skip-step and optimizer changes had relapsed."),
            explanation=(
                "A 2-layer GPT (d 128, 4 heads, context 64) on the standard library's own "
                "source bytes, AdamW b2 0.95. Without qk-layernorm the largest attention logit "
                "q.k/sqrt(d) grows with lr: tens at 3e-3, thousands at 3e-2, tens of thousands "
                "at 1e-1, and the attention entropy collapses to 0 (one-hot attention). "
                "qk-layernorm keeps it near 20 at 1e-1 and the loss is lower."),
            variants=(
                Variant("lr1e-1", "lr 1e-1", b, "failing"),
                Variant("lr1e-1-qknorm", "lr 1e-1, qk-layernorm",
                        replace(b, qk_norm=True), "fix"),
                Variant("lr3e-2", "lr 3e-2", replace(b, lr=3e-2), "compare"),
                Variant("lr3e-3", "lr 3e-3", replace(b, lr=3e-3), "fix"),
            ),
            spike_factor=None)
    if name == "output-logit-divergence":
        b = _LOGZ
        return Scenario(
            name=name, seed="text", title="My LM's output logits run away",
            story=("The logits' normaliser log Z of a language model drifts far from 0 and "
                   "stays there; the loss looks fine for now. z-loss is the standard fix "
                   "(Wortsman et al. 2023; OLMo 2)."),
            explanation=(
                "The same GPT with qk-layernorm (attention logits stay bounded) and large "
                "output logits (the LM head's output times 10, a stand-in for a wide "
                "model's), AdamW at lr 1e-2 without warmup: log Z = logsumexp of the output "
                "logits jumps from 8 to about 25 in the first steps and stays above 15. "
                "Cross-entropy cannot see a shift of all logits, so only a z-loss holds log "
                "Z. The diagnosis computes the coefficient c = 1/(4|log Z|) = 0.01 from the "
                "measured log Z: with it log Z returns to about 0 and the drift is gone, at "
                "a loss 0.13 nats higher after 60 steps; PaLM's 1e-4 pulls 100x less and "
                "does not hold log Z within 60 steps. The drift starts in the first, "
                "unwarmed steps, so the diagnosis also proposes a linear warmup over "
                "2/(1-b2) = 40 steps, which prevents it (and trains further)."),
            variants=(
                Variant("no-zloss", "lr 1e-2, no z-loss", b, "failing"),
                Variant("zloss", f"z-loss {LOGZ_FIX:g} (the computed coefficient)",
                        replace(b, z_loss=LOGZ_FIX), "fix"),
                Variant("warmup", "lr warmup over 2/(1-b2) = 40 steps", replace(b, warmup=40),
                        "fix"),
                Variant("zloss1e-4", "z-loss 1e-4 (PaLM's)", replace(b, z_loss=1e-4),
                        "compare"),
            ),
            spike_factor=None)
    if name == "fp16-loss-scale":
        b = _FP16
        return Scenario(
            name=name, seed="text", title="My fp16 run dies with the loss scale at its floor",
            story=("Mixed-precision training with a GradScaler: the scaler halves its scale "
                   "step after step, every step is skipped, the loss is NaN and never "
                   "comes back."),
            explanation=(
                "fp16 storage of activations and attention logits is emulated on the CPU "
                "(rounded to fp16 after each block and in attention). At lr 3e-1 the attention "
                "logits pass fp16's 65504 within a few steps: the forward pass overflows, the "
                "GradScaler skips the step and halves its scale, and since skipped steps "
                "change nothing, it overflows again: the scale falls to 0. bf16 (range 3e38) "
                "does not overflow; at lr 3e-3 fp16 is fine."),
            variants=(
                Variant("fp16", "fp16 + GradScaler, lr 3e-1", b, "failing"),
                Variant("bf16", "bf16, lr 3e-1", replace(b, precision="bf16"), "fix"),
                Variant("fp16-lr3e-3", "fp16 + GradScaler, lr 3e-3", replace(b, lr=3e-3),
                        "compare"),
            ),
            spike_factor=None)
    if name == "epsilon-scale":
        b = _EPS
        return Scenario(
            name=name, seed="text", title="My transformer barely trains with a large eps",
            story=("eps was raised for stability (or copied from a setting with a different "
                   "gradient scale) and the loss now creeps down: Adam has quietly become SGD. "
                   "eps matters once the gradient RMS approaches it (Everett et al. 2024)."),
            explanation=(
                "The same GPT at lr 3e-3 with eps 1e-1: the typical tensor's gradient RMS is "
                "far below eps, so sqrt(v_hat) + eps is about eps and every step is "
                "lr/eps times the gradient: tiny. The diagnosis warns (a finding of kind "
                "'warning': the loss has not spiked, it just does not go down) and computes "
                "eps as 0.1x the measured gradient RMS; torch's default 1e-8 trains."),
            variants=(
                Variant("eps1e-1", "eps 1e-1", b, "failing"),
                Variant("eps1e-8", "eps 1e-8 (torch's default)", replace(b, eps=1e-8), "fix"),
            ),
            spike_factor=None)
    raise KeyError(f"unknown text scenario {name!r}")


SCENARIOS = ("attention-logit-growth", "output-logit-divergence", "fp16-loss-scale",
             "epsilon-scale")
