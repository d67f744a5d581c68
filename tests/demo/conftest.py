"""Run the demo-model tests on one intra-op thread.

At these tensor sizes one thread is as fast as two on an idle 2-core machine, and it does not
collapse when other processes (a parallel test run, the app) share the cores: OpenMP threads
that spin-wait on a busy machine made the same tests 10-20x slower.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
