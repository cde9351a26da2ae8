"""A tiny Hugging Face GPT-2 from a config (sdpa attention, random init, CPU) and its batch."""

from __future__ import annotations

import torch


def tiny_gpt2(seed: int = 0, *, dropout: float = 0.0):
    """(model, loss_fn, optimizer) for a 2-layer, 32-wide GPT-2 on a fixed 8x16 token batch.

    Dropout 0 (and train mode) lets SDPA take its flash kernel on the CPU, which has no
    double backward: the case of issue #12."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    tokens = torch.randint(0, cfg.vocab_size, (8, 16), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn():
        return model(tokens, labels=tokens).loss

    return model, loss_fn, opt


def train(opt, loss_fn, steps: int) -> None:
    """``steps`` plain Adam steps on ``loss_fn``."""
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
