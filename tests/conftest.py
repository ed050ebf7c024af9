"""Test configuration.

One torch thread per process: the suite runs with ``-n 2`` on 2 cores, and on shared CPUs two
threads made small-tensor loops many times slower.
"""

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("mcsample", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("mcsample")
