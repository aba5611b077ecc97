"""Argument checks shared by the public entry points.

Every check raises ``TypeError`` or ``ValueError`` naming the argument, what was
expected and what was received, so that bad input never turns into a silent
wrong answer deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers
import struct

import torch

#: Largest head_dim the bitmap format and the kernels support.
MAX_HEAD_DIM = 256
#: A sparsity that is exactly the float32 rounding of a number of this many decimals is taken as that number.
_SPARSITY_DECIMALS = 6
#: Floating dtypes a KV cache may hold.
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def check_sparsity(name: str, sparsity: object) -> float:
    """Return ``sparsity`` as a float after checking it is a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    value = float(sparsity)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (fraction of entries zeroed), got {sparsity!r}")
    snapped = round(value, _SPARSITY_DECIMALS)
    if value != snapped and _float32(value) == value and _float32(snapped) == value and snapped < 1.0:
        value = snapped  # a float32 value (0.699999988) that is the float32 of a short decimal (0.7)
    return value + 0.0  # -0.0 becomes 0.0


def check_tensor(name: str, x: object, ndim: int | None = None, dtypes: tuple | None = CACHE_DTYPES) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` with one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_head_dim(name: str, head_dim: int) -> int:
    """Check that ``head_dim`` is an int with ``1 <= head_dim <= MAX_HEAD_DIM``; return it as an int."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral):
        raise TypeError(f"{name} must have an int head_dim, got {type(head_dim).__name__} {head_dim!r}")
    head_dim = int(head_dim)
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} must have head_dim in [1, {MAX_HEAD_DIM}], got {head_dim}")
    return head_dim


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Check that ``value`` is an int no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_scale(scale: object) -> float:
    """A softmax scale: a finite real number (not a bool or a string)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite real number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    return float(scale)
