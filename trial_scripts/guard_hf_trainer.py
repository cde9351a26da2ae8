"""Trial: the Guard through the HF Trainer callback (GPT-2 from a config, sdpa, tiny, CPU).

Usage: python trial_scripts/guard_hf_trainer.py LR BS [blowup] [resume]
healthy: expect no guard action.  blowup: lr x100 from step 60 (a scheduler), expect an action.
resume: train 40 steps with checkpointing, then resume to 80 from checkpoint-40.
"""
import logging
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from stablestep.guard import GuardPolicy
from stablestep.integrations.transformers import StablestepCallback

logging.basicConfig(level=logging.WARNING)
lr, bs = float(sys.argv[1]), int(sys.argv[2])
blow = "blowup" in sys.argv
resume = "resume" in sys.argv
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
seq = (torch.randint(-2, 3, (4096, 33), generator=g).cumsum(1) % 64)


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return len(seq)

    def __getitem__(self, i):
        return {"input_ids": seq[i], "labels": seq[i]}


cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=64,
                 bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
model = GPT2LMHeadModel(cfg)
out = f"/tmp/trial/hf_{lr}_{bs}{'_blow' if blow else ''}{'_res' if resume else ''}"
steps = 80 if resume else 200
args = TrainingArguments(output_dir=out, per_device_train_batch_size=bs, learning_rate=lr,
                         max_steps=40 if resume else steps, lr_scheduler_type="constant",
                         warmup_steps=0, weight_decay=0.0, logging_steps=20, report_to=[],
                         save_strategy="steps" if resume else "no", save_steps=40,
                         use_cpu=True, disable_tqdm=True, seed=0, max_grad_norm=0.0)
opt = torch.optim.Adam(model.parameters(), lr=lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 100.0 if (blow and s >= 60) else 1.0)
cb = StablestepCallback(run="r", guard=GuardPolicy(), overwrite=not resume)
tr = Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb], optimizers=(opt, sched))
tr.train()
if resume:
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args.max_steps = 80
    cb = StablestepCallback(run="r", guard=GuardPolicy())
    tr = Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb], optimizers=(opt, sched))
    tr.train(resume_from_checkpoint=f"{out}/checkpoint-40")
guard = cb.guard
s = guard.summary() if guard is not None else None
print(f"HF lr={lr} bs={bs} blow={blow}: logs {[ (h.get('step'), round(h.get('loss', float('nan')),3)) for h in tr.state.log_history if 'loss' in h]}")
print("summary:", s)
print("guard keys in log_history:", sorted({k for h in tr.state.log_history for k in h if 'guard' in k}))
print("store under", out)
