#!/bin/sh
# Problems found by the trial in areas it may not edit (diagnosis/, lab/). Run from the
# repository root; each prints what a user sees.
PY="env PYTHONPATH=src OMP_NUM_THREADS=1 /work/main/.venv/bin/python"

echo "== 1. lab: a mistyped name lists only the first four stories (the 4 transformer ones missing)"
$PY -m stablestep lab run attention-growth --out /tmp/trial_lab_x

echo "== 2. diagnose/report on the HF callback's default store directory (output_dir holds stablestep.db)"
mkdir -p /tmp/trial_hfdir && $PY - <<'PYEOF'
import torch, stablestep
m = torch.nn.Linear(2, 1); o = torch.optim.Adam(m.parameters())
with stablestep.Monitor(m, o, store="/tmp/trial_hfdir/stablestep.db", run="r", overwrite=True) as mon:
    for _ in range(20):
        o.zero_grad(); l = m(torch.randn(4, 2)).pow(2).mean(); l.backward(); mon.observe(l); o.step()
PYEOF
$PY -m stablestep diagnose /tmp/trial_hfdir

echo "== 3. lr x100 mid-run sends an MLP classifier to chance level (2.3 vs 1.1 before): the guard"
echo "==    takes no action (jump factor 3 > chance/pre-jump ratio) and diagnose says 'a loss spike that recovered'"
$PY trial_scripts/guard_healthy_plain.py blowup 2>&1 | grep "^mlp"
$PY -m stablestep diagnose /tmp/trial/healthy_mlp_0.001_32_blow.db 2>&1 | grep -A2 "why:"
