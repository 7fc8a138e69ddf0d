"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite. Most tests run thousands of tiny ops, and on a 2-core machine
    two OpenMP threads waiting on each other at every op made files 3-10x slower (measured: test_clip.py 22 s
    vs 60-85 s, test_unet_condition.py 7 s vs 83 s for its tiny cases, test_pixel_pipeline.py 23 s vs 115 s).
    Both sides of every comparison run with the same setting, so parity holds at any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
