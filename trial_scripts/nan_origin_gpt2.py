"""Trial: HF GPT-2 (tiny, from a config, sdpa) whose layer-1 attention logits overflow fp32.

At step 30 the q/k projection of h.1 is scaled by 1e20 (q.k ~ 1e40 > fp32 max): the
softmax gets inf and makes NaN inside `transformer.h.1.attn`.
Usage: python trial_scripts/nan_origin_gpt2.py STORE [guard]
Expected: diagnose names transformer.h.1.attn (forward).
"""
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import stablestep
from stablestep import MonitorConfig

torch.manual_seed(0)
cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                 attn_implementation="sdpa")
model = GPT2LMHeadModel(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.randint(0, 128, (256, 33))
guard = None
with stablestep.Monitor(model, opt, store=sys.argv[1], run="gpt2", overwrite=True,
                        config=MonitorConfig(keep_batch=True)) as mon:
    if len(sys.argv) > 2:
        guard = stablestep.Guard(model, opt, monitor=mon)
    for step in range(50):
        ids = data[torch.randint(0, 256, (16,))]
        if step == 30:
            with torch.no_grad():
                model.transformer.h[1].attn.c_attn.weight[:, :128] *= 1e20
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        mon.observe(loss, batch=lambda ids=ids: model(ids, labels=ids).loss)
        if guard is None or guard.check(loss):
            opt.step()
