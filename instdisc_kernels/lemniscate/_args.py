"""Constructor arguments of the drop-in modules: any real number lemniscate's
constructors accept (Python and numpy numbers, 0-d tensors), checked and turned
into Python numbers; every error names the argument."""
from __future__ import annotations

import math
import numbers

import torch


def _scalar(v, name):
    if isinstance(v, torch.Tensor):
        if v.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} must be a real number, got a {v.dtype} tensor")
        return v.item()
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    return v


def positive_int(v, name):
    """An integer >= 1 (int, numpy integer or 0-d integer tensor) as a Python int."""
    s = _scalar(v, name)
    if not isinstance(s, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    s = int(s)
    if s < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {s}")
    return s


def real(v, name):
    """A finite real number as a Python float."""
    s = float(_scalar(v, name))
    if not math.isfinite(s):
        raise ValueError(f"{name} must be a finite number, got {s}")
    return s


def temperature(v, name="T"):
    t = real(v, name)
    if t <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {t}")
    return t


def momentum(v, name="momentum"):
    m = real(v, name)
    if not 0 <= m < 1:
        raise ValueError(f"{name} must be in [0, 1), got {m}")
    return m


def normalization(v, name="Z"):
    """Z: None or a negative number (lemniscate's -1: estimate it on the first batch) -> -1.0,
    else a positive finite number."""
    if v is None:
        return -1.0
    z = real(v, name)
    if z == 0:
        raise ValueError(f"{name} must be a positive finite number (or None / negative: estimate it), got 0")
    return -1.0 if z < 0 else z
