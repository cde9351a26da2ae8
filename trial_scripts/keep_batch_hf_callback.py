"""Trial: MonitorConfig(keep_batch=True) through the HF Trainer callback, with the Guard.

GPT-2 (tiny, sdpa); at step 20 h.1's q/k projection is scaled by 1e20 -> NaN in h.1.attn.
Expected (by the README's promise of keep_batch + the Guard): a nan-origin event naming
transformer.h.1.attn. Prints what the store's nan-origin events say.
"""
import logging
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import stablestep
from stablestep import MonitorConfig
from stablestep.guard import GuardPolicy
from stablestep.integrations.transformers import StablestepCallback

logging.basicConfig(level=logging.WARNING)
g = torch.Generator().manual_seed(0)
seq = (torch.randint(-2, 3, (1024, 33), generator=g).cumsum(1) % 64)


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return len(seq)

    def __getitem__(self, i):
        return {"input_ids": seq[i], "labels": seq[i]}


class Sabotage(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 20:
            with torch.no_grad():
                model.transformer.h[1].attn.c_attn.weight[:, :128] *= 1e20


torch.manual_seed(0)
cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=64,
                 bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
model = GPT2LMHeadModel(cfg)
out = "/tmp/trial/hf_keep"
args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, learning_rate=1e-3,
                         max_steps=30, report_to=[], save_strategy="no", use_cpu=True,
                         disable_tqdm=True, logging_steps=10, max_grad_norm=0.0,
                         gradient_accumulation_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
cb = StablestepCallback(run="r", guard=GuardPolicy(), overwrite=True,
                        config=MonitorConfig(keep_batch=True))
Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb, Sabotage()]).train()
run = stablestep.open_run(f"{out}/stablestep.db", "r")
for e in run.events:
    if "origin" in str(e):
        print("EVENT", e)
