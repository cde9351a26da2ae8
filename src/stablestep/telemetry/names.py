"""Names of the per-step metrics in a run store: the contract between the Monitor
(which writes them), the curvature probes, the diagnosis and the report (which read them).

Every metric is a scalar per step. Per-tensor metrics append ``/<parameter name>``
to a base name (e.g. ``grad_norm/encoder.weight``).
"""

LOSS = "loss"
LOSS_SPREAD = "loss_spread"  # max - min over ranks of the per-rank loss (torch.distributed)
LR = "lr"  # lr of param group 0 used by this step
GRAD_NORM = "grad_norm"  # global L2 norm of the gradients
GRAD_NONFINITE = "grad_nonfinite"  # number of NaN/Inf gradient entries
PARAM_NORM = "param_norm"  # global L2 norm of the parameters before the step
UPDATE_NORM = "update_norm"  # ||theta_after - theta_before||
UPDATE_RATIO = "update_ratio"  # update_norm / param_norm
UPDATE_COS = "update_cos"  # cos(update, -g)

# Adam family: effective per-coordinate step lr/(1-b1^t) / (sqrt(v_hat) + eps_t),
# the diagonal of P^-1 (stablestep.optim.inspect.effective_step).
EFF_STEP_P50 = "eff_step_p50"
EFF_STEP_P90 = "eff_step_p90"
EFF_STEP_P99 = "eff_step_p99"
EFF_STEP_MAX = "eff_step_max"
EPS_SHARE = "eps_share"  # share of coordinates with sqrt(v_hat) < eps_t
G2V_RMS = "g2v_rms"  # RMS over coordinates of g^2 / v_hat (StableAdamW's early warning)
G2V_MAX = "g2v_max"
AMSGRAD_GAP = "amsgrad_gap"  # sum(max_v - v) / sum(max_v), 0 when v is at its max

# Curvature (stablestep.curvature), stored every ``curvature_every`` steps.
SHARPNESS = "sharpness"  # lam_max(H)
PRECOND_SHARPNESS = "precond_sharpness"  # lam_max(P^-1 H)
PRECOND_THRESHOLD = "precond_threshold"  # (2 + 2*b1)/(1 - b1) for Adam; 2+2mu for heavy ball
LR_SHARPNESS = "lr_sharpness"  # lr * lam_max(H)
GD_THRESHOLD = "gd_threshold"  # 2 (GD), 2 + 2*mu (heavy ball), ... for lr * lam_max(H)

# Event kinds recorded in the store (besides metrics).
EVENT_NONFINITE = "non-finite"
EVENT_GUARD = "guard"
