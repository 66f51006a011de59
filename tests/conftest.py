"""Test-suite settings: tiny models run fastest on one thread, and one thread keeps results reproducible."""

import torch

torch.set_num_threads(1)
