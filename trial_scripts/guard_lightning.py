"""Trial: the Guard through the Lightning callback, healthy minibatch MLP classification.

Usage: python trial_scripts/guard_lightning.py LR BS [blowup]   (blowup: lr x100 from step 150)
"""
import logging
import sys

import lightning.pytorch as L
import torch
import torch.nn as nn

from stablestep.guard import GuardPolicy
from stablestep.integrations.lightning import StablestepCallback

logging.basicConfig(level=logging.WARNING)
lr, bs, blow = float(sys.argv[1]), int(sys.argv[2]), "blowup" in sys.argv
g = torch.Generator().manual_seed(1)
X = torch.randn(4096, 20, generator=g)
Y = (X @ torch.randn(20, 10, generator=g) + 0.5 * torch.randn(4096, 10, generator=g)).argmax(1)


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def training_step(self, b, i):
        return nn.functional.cross_entropy(self.net(b[0]), b[1])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 100.0 if blow and k >= 150 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}


dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=bs, shuffle=True)
cb = StablestepCallback(store=f"/tmp/trial/light_{lr}_{bs}{'_blow' if blow else ''}.db", run="r",
                        guard=GuardPolicy(), overwrite=True)
tr = L.Trainer(max_steps=300, callbacks=[cb], logger=False, accelerator="cpu",
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
tr.fit(M(), dl)
print(f"lightning lr={lr} bs={bs} blow={blow}:", cb.guard.summary())
