"""Shared fixtures: one generated tiny checkpoint per test session, and runtimes loaded from it."""

from __future__ import annotations

import pytest
import torch

from runtime.api import Runtime
from runtime.checkpoint import make_preset


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_preset(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_rt(tiny_ckpt):
    return Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (many small kernels run faster so on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
