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
# the diagonal of P^-1 (stablestep.formulas.effective_step).
EFF_STEP_P50 = "eff_step_p50"
EFF_STEP_P90 = "eff_step_p90"
EFF_STEP_P99 = "eff_step_p99"
EFF_STEP_MAX = "eff_step_max"
EPS_SHARE = "eps_share"  # share of coordinates with sqrt(v_hat) < eps_t
G2V_RMS = "g2v_rms"  # sqrt(mean(g^2 / max(v_hat, eps_t^2))), current v_hat: formulas.g2v_rms
G2V_MAX = "g2v_max"
AMSGRAD_GAP = "amsgrad_gap"  # sum(max_v - v) / sum(max_v), 0 when v is at its max

# Curvature (stablestep.curvature), stored every ``curvature_every`` steps.
SHARPNESS = "sharpness"  # lam_max(H)
PRECOND_SHARPNESS = "precond_sharpness"  # lam_max(P^-1 H)
PRECOND_THRESHOLD = "precond_threshold"  # the bound, formulas.threshold: (2+2*b1)/(1-b1) Adam
LR_SHARPNESS = "lr_sharpness"  # lr * lam_max(H)
GD_THRESHOLD = "gd_threshold"  # formulas.sgd_threshold: 2, heavy ball, Nesterov, for lr*lam_max
GRAD_CURVATURE = "grad_curvature"  # g.(S H g)/g.g, S the lr-free preconditioner; vs 2/lr
CRITICAL_SHARPNESS = "critical_sharpness"  # 2/eta_c, eta_c: lr at which the loss rises; vs 2/lr
SECANT = "secant_curvature"  # free: u.(g_{t+1}-g_t)/(u.P u), recorded at t+1 (telemetry.secant)
SECANT_COS = "secant_cos"  # |u.dg|/(|u|(|g_t|+|g_{t+1}|)): how much of dg lies along u
CURV_SECONDS = "curvature_seconds"  # wall time of the curvature estimate at this step
CURV_HVPS = "curvature_hvps"  # Hessian-vector products it used
CURV_SHARE = "curvature_share"  # the probe's share of wall time since its first estimate

# Event kinds recorded in the store (besides metrics).
EVENT_NONFINITE = "non-finite"
EVENT_GUARD = "guard"
EVENT_CURVATURE = "curvature-failed"  # a curvature estimate raised; data: {"error", "backend"}
EVENT_NAN_ORIGIN = "nan-origin"  # where a NaN was born (stablestep.diagnosis.nan_origin)

# Model probes (stablestep.telemetry.model_probes.ModelProbes), on the detail cadence.
ATTN_LOGIT_MAX = "attn_logit_max"  # max q.k*scale over layers (per layer: /<module>)
ATTN_ENTROPY = "attn_entropy"  # per layer: /<module>, mean attention entropy (nats)
ATTN_ENTROPY_MIN = "attn_entropy_min"  # min over layers of attn_entropy
LM_LOGZ = "lm_logz"  # mean logsumexp of the LM head's logits per position
LM_LOGZ_ABSMAX = "lm_logz_absmax"  # max |logsumexp| over positions
ACT_RMS = "act_rms"  # per block: /<module>, RMS of the block's output
ACT_RMS_MAX = "act_rms_max"
GRAD_RMS = "grad_rms"  # RMS of all gradient coordinates
EPS_GRAD_RATIO = "eps_grad_ratio"  # eps_t / median per-tensor grad RMS (/<tensor>: that tensor)
EPS_GRAD_RATIO_MAX = "eps_grad_ratio_max"
LOSS_SCALE = "loss_scale"  # torch.amp.GradScaler's scale at this step
SKIPPED_STEPS = "skipped_steps"  # steps the GradScaler skipped so far (cumulative)
