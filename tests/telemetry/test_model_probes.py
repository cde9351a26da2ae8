"""Each model probe equals a direct computation from the model's own tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stablestep.lab.text import TextConfig, TinyGPT
from stablestep.telemetry import Monitor
from stablestep.telemetry.model_probes import ModelProbes, attention_stats


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _ref(q, k, scale, causal=True):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    t = logits.shape[-1]
    if causal:
        logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    return logits.max().item(), logits


def test_tiny_gpt_probes_equal_direct_computation():
    cfg = TextConfig(n_layer=2, d=32, n_head=2, ctx=16, batch=3, init_scale=0.5)
    model = TinyGPT(cfg)
    probes = ModelProbes(model)
    assert probes.attention == ["blocks.0.attn", "blocks.1.attn"]
    assert probes.lm_head == "lm_head" and probes.blocks == ["blocks.0", "blocks.1"]
    seen = {}
    hooks = [model.blocks[i].attn.register_forward_pre_hook(
        lambda m, a, i=i: seen.__setitem__(i, a[0].detach())) for i in range(2)]
    idx = torch.randint(256, (3, 16))
    logits = model(idx)
    out = probes.collect(0)
    for h in hooks:
        h.remove()
    for i in range(2):
        attn = model.blocks[i].attn
        qkv = seen[i] @ attn.qkv.weight.T + attn.qkv.bias  # q, k by hand from the weights
        q, k = (z.view(3, 16, 2, 16).transpose(1, 2) for z in qkv.split(32, dim=-1)[:2])
        lmax, lg = _ref(q, k, 16**-0.5)
        p = torch.softmax(lg, -1)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean().item()
        assert out[f"attn_logit_max/blocks.{i}.attn"] == pytest.approx(lmax, rel=1e-5)
        assert out[f"attn_entropy/blocks.{i}.attn"] == pytest.approx(ent, rel=1e-4, abs=1e-6)
    x = model.tok(idx) + model.pos(torch.arange(16))
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        assert out[f"act_rms/blocks.{i}"] == pytest.approx(x.pow(2).mean().sqrt().item(),
                                                          rel=1e-5)
    logz = torch.logsumexp(logits.double(), -1)
    assert out["lm_logz"] == pytest.approx(logz.mean().item(), rel=1e-5)
    assert out["lm_logz_absmax"] == pytest.approx(logz.abs().max().item(), rel=1e-5)
    assert out["attn_logit_max"] == max(out[f"attn_logit_max/blocks.{i}.attn"] for i in (0, 1))


def test_multihead_attention_probe_matches_the_module_own_weights():
    mha = nn.MultiheadAttention(24, 3, batch_first=True)
    model = nn.Sequential(mha)
    probes = ModelProbes(model, lm_head=False, blocks=False)
    x = torch.randn(2, 7, 24) * 3
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True = not allowed
    _, w = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    out = probes.collect(0)
    q = (x @ mha.in_proj_weight[:24].T + mha.in_proj_bias[:24]).view(2, 7, 3, 8).transpose(1, 2)
    k = (x @ mha.in_proj_weight[24:48].T + mha.in_proj_bias[24:48]).view(2, 7, 3, 8)
    lmax, _ = _ref(q, k.transpose(1, 2), 8**-0.5)
    ent = torch.special.entr(w.double()).sum(-1).mean().item()  # torch's own softmax
    assert out["attn_logit_max/0"] == pytest.approx(lmax, rel=1e-5)
    assert out["attn_entropy/0"] == pytest.approx(ent, rel=1e-4)


def _hf_check(model, attn_names):
    probes = ModelProbes(model, blocks=False)
    assert probes.attention == attn_names
    idx = torch.randint(100, (2, 12))
    res = model(idx, output_attentions=True)
    out = probes.collect(0)
    for name, w in zip(attn_names, res.attentions, strict=True):
        ent = torch.special.entr(w.double()).sum(-1).mean().item()  # the model's own softmax
        assert out[f"attn_entropy/{name}"] == pytest.approx(ent, rel=1e-4)
    logz = torch.logsumexp(res.logits.double(), -1)
    assert out["lm_logz"] == pytest.approx(logz.mean().item(), rel=1e-5)
    return out


def test_gpt2_attention_probe_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100,
                                  n_positions=32, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.mul_(20)  # sharp attention in layer 1
    caught = {}
    h = model.transformer.h[1].attn.c_attn.register_forward_hook(
        lambda m, a, o: caught.__setitem__("qkv", o.detach()))
    out = _hf_check(model, ["transformer.h.0.attn", "transformer.h.1.attn"])
    h.remove()
    q, k, _ = caught["qkv"].split(32, dim=-1)
    q, k = (z.view(2, 12, 4, 8).transpose(1, 2) for z in (q, k))
    lmax, _ = _ref(q, k, 8**-0.5)
    assert out["attn_logit_max/transformer.h.1.attn"] == pytest.approx(lmax, rel=1e-5)


def test_llama_attention_probe_matches_hugging_face_with_rope_and_gqa():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=100, max_position_embeddings=32,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
    _hf_check(model, ["model.layers.0.self_attn", "model.layers.1.self_attn"])


def test_a_named_module_with_a_qk_function():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 16)

        def forward(self, x):
            return self.w(x)

    model = nn.Sequential(Fused())

    def qk(m, args, kwargs):
        q, k = m.w(args[0]).split(8, -1)
        return q[:, None], k[:, None]

    probes = ModelProbes(model, attention={"0": qk}, lm_head=False, blocks=False)
    x = torch.randn(2, 5, 8)
    model(x)
    out = probes.collect(0)
    q, k = model[0].w(x).split(8, -1)
    assert out["attn_logit_max/0"] == pytest.approx(_ref(q[:, None], k[:, None], 8**-0.5)[0],
                                                    rel=1e-5)
    with pytest.raises(ValueError, match="attention module 'nope' not found"):
        ModelProbes(model, attention={"nope": qk})


def test_attention_stats_respects_masks():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    allowed = torch.tensor([True, True, False, False])
    lmax, _ = attention_stats(q, k, causal=False, allowed=allowed)
    assert lmax.item() == pytest.approx((q @ k.transpose(-1, -2))[..., :2].max().item()
                                        / math.sqrt(8), rel=1e-5)


def test_eps_ratio_equals_eps_over_the_median_tensor_rms():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
    model(torch.randn(16, 4)).pow(2).sum().backward()
    out = ModelProbes(model, optimizer=opt).collect(0)
    rms = torch.stack([p.grad.pow(2).mean().sqrt() for p in model.parameters()])
    assert out["eps_grad_ratio"] == pytest.approx((1e-3 / rms).median().item(), rel=1e-5)
    assert out["eps_grad_ratio_max"] == pytest.approx((1e-3 / rms).max().item(), rel=1e-5)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert out["grad_rms"] == pytest.approx(g.pow(2).mean().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("eps_mode", ["torch", "tf"])
def test_eps_ratio_uses_eps_t_of_the_step_about_to_be_applied(eps_mode):
    """TF/Keras' epsilon hat is added to sqrt(v), i.e. eps_hat/sqrt(1-b2^t) to sqrt(v_hat):
    the ratio compares that (written out here from the update rule), not the raw eps."""
    import stablestep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    b2, eps = 0.95, 1e-3
    opt = stablestep.Adam(model.parameters(), lr=1e-3, betas=(0.9, b2), eps=eps,
                          eps_mode=eps_mode)
    probes = ModelProbes(model, optimizer=opt)
    x = torch.randn(16, 4)
    for t in range(1, 5):  # t: the step the optimizer is about to take
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        out = probes.collect(t - 1)
        eps_t = eps if eps_mode == "torch" else eps / math.sqrt(1 - b2**t)
        rms = torch.stack([p.grad.pow(2).mean().sqrt() for p in model.parameters()])
        assert out["eps_grad_ratio"] == pytest.approx((eps_t / rms).median().item(), rel=1e-5)
        assert out["eps_grad_ratio_max"] == pytest.approx((eps_t / rms).max().item(), rel=1e-5)
        opt.step()
    assert eps_mode == "torch" or eps / math.sqrt(1 - b2**4) > 2 * eps  # the test can tell


class _Scaler:  # what the probes read of torch.amp.GradScaler: its scale tensor
    def __init__(self):
        self._scale = torch.tensor(8.0)


def test_skipped_steps_counted_from_the_scale_and_resumed_identically():
    model = nn.Linear(2, 2)

    def play(probes, scaler, scales, start):
        got = []
        for i, s in enumerate(scales):
            scaler._scale = torch.tensor(s)
            got.append(probes.collect(start + i).get("skipped_steps"))
        return got

    sc = _Scaler()
    whole = play(ModelProbes(model, scaler=sc, every=1), sc, [8, 4, 4, 2, 1, 2, 1], 0)
    assert whole[-1] == 4  # four times the scale went down
    sc2 = _Scaler()
    first = ModelProbes(model, scaler=sc2, every=1)
    play(first, sc2, [8, 4, 4], 0)
    state = first.state_dict()
    second = ModelProbes(model, scaler=sc2, every=1)
    second.load_state_dict(state)
    assert play(second, sc2, [2, 1, 2, 1], 3) == whole[3:]


def test_monitor_records_probes_on_its_cadence_only(tmp_path):
    cfg = TextConfig(n_layer=1, d=16, n_head=2, ctx=8, batch=2)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probes = ModelProbes(model, optimizer=opt)
    calls = []
    model.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(probes._armed))
    with Monitor(model, opt, store=tmp_path / "s.db", run="r", state_every=3,
                 model_probes=probes) as mon:
        for _ in range(7):
            opt.zero_grad()
            model(torch.randint(256, (2, 8))).logsumexp(-1).mean().backward()
            mon.observe(torch.tensor(1.0))
            opt.step()
        run = mon.read()
    steps, _ = run.series("attn_logit_max")
    assert steps.tolist() == [0, 3, 6]
    assert calls == [True, False, False, True, False, False, True]
    assert probes._handles == []  # close() removed the hooks
