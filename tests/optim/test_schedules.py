"""Schedules as LambdaLR multipliers, composition, and bias_correction (seed 002)."""

import math

import pytest
import torch

from stablestep.optim import Adam, schedules


def test_lambdalr_drives_our_optimizer():
    p = torch.zeros(2, requires_grad=True)
    opt = Adam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules.exponential_decay(1, 0.5))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_inverse_sqrt_is_adam_papers_alpha_t():
    s = schedules.inverse_sqrt(0.2)
    assert [s(k) for k in range(4)] == pytest.approx([0.2 / math.sqrt(t) for t in (1, 2, 3, 4)])


def test_warmup_cosine_product_and_join():
    w = schedules.linear_warmup(4)
    assert [w(k) for k in (0, 2, 4, 9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    prod = w * schedules.cosine(8)
    assert prod(2) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert (3 * w)(2) == pytest.approx(1.5)
    j = schedules.join([schedules.linear_warmup(10), schedules.inverse_sqrt()], [10])
    assert j(5) == pytest.approx(0.5)
    assert j(10) == pytest.approx(1.0)  # the second schedule restarts at its own step 0
    assert j(13) == pytest.approx(0.5)
    assert "linear_warmup(10)" in repr(j)


def test_bias_correction_tends_to_one_not_a_decay():
    assert schedules.bias_correction(1) == pytest.approx(math.sqrt(0.001) / 0.1)
    values = [schedules.bias_correction(t) for t in (1, 10, 100, 1000, 10_000, 100_000)]
    assert values[-1] == pytest.approx(1.0, abs=1e-9)
    assert abs(values[-2] - 1.0) < 1e-4
    # default betas: it dips (0.15 at t = 10), then rises monotonically to 1; never above 1
    assert values[1] < values[0]
    assert values[1:] == sorted(values[1:])
    assert max(values) <= 1.0


def test_bias_correction_matches_torch_vs_tf_step():
    """Adam's first step in TF form is lr * bias_correction(1) * m/(sqrt(v)+eps_hat)."""
    p = torch.zeros(1, requires_grad=True)
    opt = Adam([p], lr=1.0, eps=0.0, eps_mode="tf")
    p.grad = torch.tensor([2.0])
    opt.step()
    m, v = 0.1 * 2.0, 0.001 * 4.0
    assert -p.item() == pytest.approx(schedules.bias_correction(1) * m / math.sqrt(v))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: schedules.exponential_decay(0, 0.9),
         "decay_steps must be a positive integer, got 0"),
        (lambda: schedules.exponential_decay(10, 0.0), "decay_rate must be > 0, got 0.0"),
        (lambda: schedules.cosine(10, alpha=2.0), "alpha must be in [0, 1], got 2.0"),
        (lambda: schedules.linear_warmup(2.5), "warmup_steps must be a positive integer, got 2.5"),
        (lambda: schedules.inverse_sqrt(offset=0), "offset must be a positive integer, got 0"),
        (lambda: schedules.bias_correction(0), "t must be an integer >= 1, got 0"),
        (lambda: schedules.bias_correction(3, 1.0), "Invalid beta parameter at index 0: 1.0"),
        (lambda: schedules.join([schedules.constant()], [3]),
         "need len(boundaries) == len(schedules) - 1, got 1 and 1"),
        (lambda: schedules.join([schedules.constant()] * 3, [5, 5]),
         "boundaries must be non-negative and strictly increasing, got [5, 5]"),
        (lambda: schedules.constant()(-1), "step must be >= 0, got -1"),
    ],
)
def test_validation_messages(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def _every_kind():
    s = schedules
    return s.join([s.linear_warmup(3, start=0.1), s.inverse_sqrt(0.5) * 2.0,
                   s.cosine(10, alpha=0.1) * s.exponential_decay(2, 0.9, staircase=True)],
                  [3, 6])


def test_lambdalr_with_a_schedule_saves_loads_and_continues_identically():
    """torch.save of the scheduler state (a Schedule is plain data, no lambda), torch.load
    with the default weights_only=True, then both runs continue with the same lrs."""
    import io

    def make():
        p = torch.zeros(2, requires_grad=True)
        opt = Adam([p], lr=0.1)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, _every_kind())

    def steps(p, opt, sched, n):
        lrs = []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(2)
            opt.step()
            sched.step()
        return lrs

    p, opt, sched = make()
    steps(p, opt, sched, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "p": p.detach()}, buf)
    rest = steps(p, opt, sched, 8)

    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True by default
    q, opt2, sched2 = make()
    with torch.no_grad():
        q.copy_(saved["p"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert steps(q, opt2, sched2, 8) == rest
    assert torch.equal(p, q)
    assert sched2.lr_lambdas[0] == sched.lr_lambdas[0]


def test_schedules_pickle_and_keep_their_values():
    import pickle

    sched = _every_kind()
    back = pickle.loads(pickle.dumps(sched))
    assert back == sched and repr(back) == repr(sched)
    assert [back(k) for k in range(14)] == [sched(k) for k in range(14)]
    # the values themselves, written out: warmup, then 2*0.5/sqrt(t), then cosine*staircase
    assert sched(0) == pytest.approx(0.1) and sched(2) == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert sched(4) == pytest.approx(1.0 / math.sqrt(2))
    c = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert sched(11) == pytest.approx(c * 0.9 ** (5 // 2))
