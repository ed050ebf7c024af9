"""Test configuration: one torch thread per xdist worker (the suite runs with -n 2 on 2 cores)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from hypothesis import settings

settings.register_profile("mcsample", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("mcsample")
