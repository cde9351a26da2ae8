"""The four seed stories as data: each scenario is a list of variants (configs) that
the one training function :func:`stablestep.lab.train.train` runs.

======================  ====  ================================================
name                    seed  story
======================  ====  ================================================
``late-explosion``      000   trains well for a long time, then explodes (tiny eps)
``periodic-spikes``     001   roughly periodic loss spikes with Adam (AMSGrad fixes)
``adam-decay``          002   Adam with and without lr decay; bias correction is no decay
``lr-divergence``       003   lr 1e-3 goes to NaN where 1e-4 works (ill-conditioning)
======================  ====  ================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stablestep.lab import problems
from stablestep.lab.config import TrainConfig, Variant


@dataclass(frozen=True)
class Scenario:
    """A seed story made runnable.

    ``name``/``seed``/``title``: identity; ``story``: the user's question in one
    paragraph; ``explanation``: what the lab shows and why; ``variants``: the failing
    setting first, then the fixes and comparisons; ``spike_factor``: the ``factor`` of
    :func:`stablestep.lab.spikes.spike_steps` for this story (``None``: spikes are not
    counted, the loss is minibatch noise); ``panels``: extra
    report panels (``"bias-correction"``, ``"period"``).
    """

    name: str
    seed: str
    title: str
    story: str
    explanation: str
    variants: tuple[Variant, ...]
    spike_factor: float | None = 3.0
    panels: tuple[str, ...] = ()

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; ``KeyError`` with the valid names otherwise."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"scenario {self.name!r} has no variant {name!r}; "
                       f"choose from {', '.join(v.name for v in self.variants)}")

    def base(self) -> TrainConfig:
        """The failing variant's config (what sweeps start from)."""
        return self.variants[0].config


def _late_explosion() -> Scenario:
    base = TrainConfig(problem="random-targets", n=256, dim=16, width=256, lr=1e-3, eps=1e-8,
                       steps=2500, curvature_every=25)
    return Scenario(
        name="late-explosion",
        seed="000",
        title="My loss explodes after a long good run, always at the same point",
        story=("Adam trains well for hundreds of thousands of steps, then the loss explodes; "
               "restarting from a checkpoint explodes at the same point. The thread blames "
               "a tiny epsilon: near the optimum v collapses and m/(sqrt(v)+eps) blows up."),
        explanation=(
            "A wide MLP memorises random targets: the loss falls to float32's floor and "
            "the gradients, hence v, collapse. The effective step lr/(sqrt(v_hat)+eps) "
            "grows steadily, the preconditioned sharpness lam_max(P^-1 H) climbs to Adam's "
            "bound (2+2*b1)/(1-b1) = 38, and the loss explodes by ten orders of magnitude, "
            "recovers (the burst refills v), and explodes again at the same kind of point. "
            "A larger eps caps the step at lr/eps and keeps P^-1 H under the bound: 1e-4 "
            "(the asker's own setting) only delays the explosion, 1e-3 prevents it, 1e-1 "
            "prevents it but trains slowly; lr/10 is stable too but ten times slower."),
        variants=(
            Variant("eps1e-8", "Adam eps=1e-8 (default)", base, "failing"),
            Variant("eps1e-4", "eps=1e-4 (the asker's setting)", replace(base, eps=1e-4),
                    "compare"),
            Variant("eps1e-3", "eps=1e-3", replace(base, eps=1e-3), "fix"),
            Variant("eps1e-1", "eps=1e-1", replace(base, eps=1e-1), "fix"),
            Variant("lr1e-4", "lr/10 (1e-4), eps=1e-8", replace(base, lr=1e-4), "fix"),
        ),
        spike_factor=10.0,
    )


def _periodic_spikes() -> Scenario:
    base = TrainConfig(problem="sin-regression", n=128, dim=4, width=256, lr=1e-3, eps=1e-8,
                       steps=4000, curvature_every=25)
    return Scenario(
        name="periodic-spikes",
        seed="001",
        title="My loss spikes roughly periodically with Adam",
        story=("Training with Keras' Adam shows roughly periodic spikes in the loss, whose "
               "frequency changes with the training-set size. The accepted answer: as the "
               "loss flattens Adam's step grows; amsgrad=True stops it."),
        explanation=(
            "Full-batch Adam on a small regression. When the loss flattens, v decays, the "
            "effective step grows until lam_max(P^-1 H) crosses (2+2*b1)/(1-b1) = 38; the "
            "loss spikes, the spike refills v, stability returns, and the cycle repeats. "
            "AMSGrad never lets v decrease, so P^-1 cannot grow: the spikes go away. The "
            "same network on 64/128/256 points spikes at a different rate."),
        variants=(
            Variant("adam", "Adam, 128 points", base, "failing"),
            Variant("amsgrad", "Adam amsgrad=True, 128 points", replace(base, amsgrad=True), "fix"),
            Variant("adam-n64", "Adam, 64 points", replace(base, n=64), "compare"),
            Variant("adam-n256", "Adam, 256 points", replace(base, n=256), "compare"),
        ),
        spike_factor=3.0,
        panels=("period",),
    )


def _adam_decay() -> Scenario:
    base = TrainConfig(problem="noisy-regression", n=2048, dim=32, batch=8, lr=3e-2,
                       eps=1e-8, steps=2000, decay_rate=0.1, decay_steps=2000, warmup=100,
                       curvature_every=50)
    return Scenario(
        name="adam-decay",
        seed="002",
        title="Should I decay the learning rate with Adam?",
        story=("Most code uses Adam with a constant lr; is exponential decay useful with "
               "Adam? One answer claims Adam already decays the lr through "
               "sqrt(1-b2^t)/(1-b1^t); another that it does not."),
        explanation=(
            "Minibatch Adam (batch 8) on a noisy linear regression whose noise floor is "
            "0.09. With a constant lr Adam keeps jittering around the optimum (each "
            "coordinate moves by about lr per step, whatever the gradient), so the loss "
            "stays well above the floor; exponential, inverse-sqrt and warmup+cosine decay "
            "shrink the jitter and get close to it. The bias-correction factor "
            "sqrt(1-b2^t)/(1-b1^t) is plotted next to the real decays: it starts at 0.32, "
            "dips to 0.15 by step 10, then rises towards 1 (0.93 at step 2000). It "
            "compensates the zero start of m and v; it is not a decay."),
        variants=(
            Variant("constant", "constant lr 3e-2", base, "failing"),
            Variant("exponential", "exponential decay 0.1^(t/2000)",
                    replace(base, schedule="exponential"), "fix"),
            Variant("inverse-sqrt", "inverse-sqrt (warmup 100)",
                    replace(base, schedule="inverse-sqrt"), "fix"),
            Variant("warmup-cosine", "warmup 100 + cosine",
                    replace(base, schedule="warmup-cosine"), "fix"),
        ),
        spike_factor=None,
        panels=("bias-correction",),
    )


def _lr_divergence() -> Scenario:
    base = TrainConfig(problem="ill-conditioned", n=256, dim=20, optimizer="sgd", lr=1e-3,
                       steps=600, curvature_every=20)
    lam = problems.exact_sharpness(problems.build(base))
    lr_max = 2.0 / lam
    safe = float(f"{0.9 * lr_max:.2g}")
    return Scenario(
        name="lr-divergence",
        seed="003",
        title="lr 1e-3 sends my loss to NaN, 1e-4 works",
        story=("With lr 1e-3 the loss grows from thousands to a trillion to NaN within an "
               "epoch; with 1e-4 everything works. Why does one order of magnitude matter, "
               "and why does minimisation increase the loss? Answer: an ill-conditioned "
               "Hessian; gradient descent diverges once the step is too large for the "
               "curvature."),
        explanation=(
            f"Least squares on unnormalised features (scales 1..{problems.ILL_SCALE:g}). "
            f"Its Hessian is 2/n X^T X with lam_max = {lam:.4g}, so gradient descent is "
            f"stable iff lr * lam_max < 2, i.e. lr < {lr_max:.3g}. lr 1e-3 puts "
            f"lr*lam_max at {1e-3 * lam:.2g}: the top direction grows by |1 - lr*lam| per "
            f"step until overflow (NaN). lr 1e-4 is stable but slow along the flat "
            f"directions; the computed {safe:.2g} (0.9 of the bound) is stable and faster; "
            "Adam's per-coordinate preconditioning also survives lr 1e-3."),
        variants=(
            Variant("gd-lr1e-3", "GD lr=1e-3", base, "failing"),
            Variant("gd-lr1e-4", "GD lr=1e-4", replace(base, lr=1e-4), "fix"),
            Variant("gd-lr-max", f"GD lr={safe:.2g} (0.9 x computed 2/lam_max)",
                    replace(base, lr=safe), "fix"),
            Variant("adam-lr1e-3", "Adam lr=1e-3", replace(base, optimizer="adam"), "compare"),
        ),
        spike_factor=3.0,
    )


_BUILDERS = {
    "late-explosion": _late_explosion,
    "periodic-spikes": _periodic_spikes,
    "adam-decay": _adam_decay,
    "lr-divergence": _lr_divergence,
}


def names() -> list[str]:
    """Names of the scenarios, in seed order."""
    return list(_BUILDERS)


# Transformer stories on real text (stablestep.lab.text; a GPT on the stdlib's sources).
TEXT = ("attention-logit-growth", "output-logit-divergence", "fp16-loss-scale",
        "epsilon-scale")


def get(name: str) -> Scenario:
    """The scenario called ``name``; ``KeyError`` naming the valid ones otherwise."""
    if name in TEXT:
        from stablestep.lab import text

        return text.scenario(name)
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; choose from "
                       f"{', '.join((*_BUILDERS, *TEXT))}") from None
