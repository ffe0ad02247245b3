"""Training tests run the tiny preset: one intra-op thread is all its tensors can use.

More threads only spin against each other on a shared CPU (a tiny linear layer took 10 ms with two
threads under load, 0.1 ms with one).
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)
