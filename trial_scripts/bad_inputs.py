"""Trial: bad input to the new options must be one clear line (an exception with a short
message), never a deep traceback from inside torch. Prints each case's outcome."""
import torch

import stablestep
from stablestep import MonitorConfig

model = torch.nn.Linear(3, 1)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)


def case(name, fn):
    try:
        fn()
        print(f"{name}: accepted")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: {type(e).__name__}: {e}")


def observe_with(batch, keep=True, store="/tmp/trial/bad.db"):
    with stablestep.Monitor(model, opt, store=store, run="b", overwrite=True,
                            config=MonitorConfig(keep_batch=keep)) as mon:
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        mon.observe(loss, batch=batch)


case("keep_batch='yes'", lambda: MonitorConfig(keep_batch="yes"))
case("keep_batch=1", lambda: MonitorConfig(keep_batch=1))
case("batch=tensor (not callable)", lambda: observe_with(torch.randn(4, 3)))
case("batch=(x, y) tuple", lambda: observe_with((torch.randn(4, 3), torch.randn(4, 1))))
case("batch=closure but keep_batch=False", lambda: observe_with(lambda: 0.0, keep=False))
case("Guard start_step=-1", lambda: stablestep.Guard(model, opt, start_step=-1))
case("Guard start_step=1.5", lambda: stablestep.Guard(model, opt, start_step=1.5))
case("Guard start_step='3'", lambda: stablestep.Guard(model, opt, start_step="3"))
case("Monitor start_step=-5", lambda: stablestep.Monitor(model, opt, store="/tmp/trial/bad2.db",
                                                         start_step=-5))
case("Monitor start_step=True", lambda: stablestep.Monitor(model, opt, store="/tmp/trial/b3.db",
                                                           start_step=True))
case("Monitor start_step=2.0", lambda: stablestep.Monitor(model, opt, store="/tmp/trial/b4.db",
                                                          start_step=2.0))
