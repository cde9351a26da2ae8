"""Shared test settings: one torch thread per test (CI has 2 cores; results must not depend
on the machine's thread count), restored afterwards for tests that change it themselves."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
