"""Shared test settings: one torch thread per test (CI has 2 cores; results must not depend
on the machine's thread count), restored afterwards for tests that change it themselves.
Keras runs on its torch backend here (the only one installed), set before any ``import keras``
as a user does: the library itself never sets it."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
