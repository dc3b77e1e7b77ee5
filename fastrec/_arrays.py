"""Input normalisation shared by the Python layer."""

from __future__ import annotations

import numpy as np


def as_numpy(x):
    """A numpy array for x: torch tensors (any device) are moved to the CPU without a copy
    when already there, bfloat16 (which numpy lacks) becomes float32; anything else goes
    through ``np.asarray``."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)
