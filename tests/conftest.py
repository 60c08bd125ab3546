"""pytest configuration: fp32, one thread per worker (xdist runs one worker per core)."""

import torch

torch.set_num_threads(1)
