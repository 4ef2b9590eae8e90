"""numpy for the host path's passes over CPU tensors, when it is installed.

The one place that imports numpy: every caller checks :func:`on_numpy` (or ``np is not
None``) at call time, so a test can switch the numpy path off by patching ``np``. numpy
does the same IEEE comparisons as torch, several times faster on CPU for bool outputs,
index extraction and small reads (``tolist``); without it the torch ops compute the same.
"""

from __future__ import annotations

import torch

try:
    import numpy as np
except ImportError:  # optional
    np = None

__all__ = ["np", "on_numpy"]

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int32, torch.int64)


def on_numpy(values: torch.Tensor) -> bool:
    """Whether ``values`` take the numpy path: CPU, a numpy dtype, numpy installed."""
    return np is not None and values.device.type == "cpu" and values.dtype in _NUMPY_DTYPES
