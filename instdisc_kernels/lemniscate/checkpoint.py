"""``load_checkpoint``: read a checkpoint written by lemniscate.pytorch's own modules
(``torch.save({'net': ..., 'lemniscate': <NCEAverage or LinearAverage>, ...})``)
without lemniscate's code, and return it with the drop-in modules in their place.

What it trusts: the file is read by ``torch.load(weights_only=True)``, so only
tensors, plain containers and an allow-list of globals are built, and no code
from the file runs. The allow-list adds, for this call only, stand-ins for the
four classes lemniscate's pickles name (``lib.NCEAverage.NCEAverage``,
``lib.LinearAverage.LinearAverage``, ``lib.NCECriterion.NCECriterion``,
``lib.alias_multinomial.AliasMethod``): empty classes whose instances only
receive the pickled attribute dict, and torch's own no-op
``torch.nn.backends.thnn._get_thnn_function_backend`` (old torch pickled it with
every module). Each stand-in is then checked (params finite and in range, bank
2-D and finite, uniform sampler) and replaced by a drop-in holding the same
``memory`` and ``params`` tensors (Z as estimated, not re-estimated).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.backends import thnn

from .criterion import NCECriterion
from .linear_average import LinearAverage
from .nce_average import NCEAverage


class _OriginalNCEAverage(nn.Module):
    """Stand-in for lib.NCEAverage.NCEAverage (receives the pickled state only)."""


class _OriginalLinearAverage(nn.Module):
    """Stand-in for lib.LinearAverage.LinearAverage."""


class _OriginalNCECriterion(nn.Module):
    """Stand-in for lib.NCECriterion.NCECriterion."""


class _OriginalAliasMethod:
    """Stand-in for lib.alias_multinomial.AliasMethod (attributes prob, alias)."""


STAND_INS = [
    (_OriginalNCEAverage, "lib.NCEAverage.NCEAverage"),
    (_OriginalLinearAverage, "lib.LinearAverage.LinearAverage"),
    (_OriginalNCECriterion, "lib.NCECriterion.NCECriterion"),
    (_OriginalAliasMethod, "lib.alias_multinomial.AliasMethod"),
    thnn._get_thnn_function_backend,
]


def load_checkpoint(path, map_location=None):
    """``torch.load`` a lemniscate checkpoint; each original NCEAverage / LinearAverage /
    NCECriterion in it (at any depth of dicts, lists, tuples) becomes the drop-in.

    Drop-in modules and everything else are returned as loaded. ``map_location`` as in
    torch.load (the original's tensors are often CUDA tensors: pass "cpu" without a GPU).
    Raises ValueError naming the field when a module's state is not a valid lemniscate one.
    """
    with torch.serialization.safe_globals(STAND_INS):
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return _convert(ckpt, "checkpoint")


def _convert(obj, where):
    if isinstance(obj, _OriginalNCEAverage):
        return _nce_average(obj, where)
    if isinstance(obj, _OriginalLinearAverage):
        return _linear_average(obj, where)
    if isinstance(obj, _OriginalNCECriterion):
        return NCECriterion(_attr(obj, "nLem", where))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _convert(obj[k], f"{where}[{k!r}]")
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(_convert(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def _attr(obj, name, where):
    if name not in obj.__dict__:
        raise ValueError(f"{where}: the pickled lemniscate module has no attribute {name!r}")
    return obj.__dict__[name]


def _buffers(obj, where, size, names):
    bufs = obj.__dict__.get("_buffers") or {}
    params, memory = bufs.get("params"), bufs.get("memory")
    if not isinstance(params, torch.Tensor) or params.shape != (size,):
        raise ValueError(f"{where}.params must be a tensor of {size} values {names}, got "
                         f"{None if params is None else tuple(params.shape)}")
    if not isinstance(memory, torch.Tensor) or memory.dim() != 2 or not memory.is_floating_point():
        raise ValueError(f"{where}.memory must be a floating (N, D) tensor")
    if not bool(torch.isfinite(memory).all()):
        raise ValueError(f"{where}.memory contains NaN or inf")
    vals = params.tolist()
    for n, v in zip(names, vals):
        if not math.isfinite(v):
            raise ValueError(f"{where}.params: {n} is {v}")
    nlem = obj.__dict__.get("nLem", memory.shape[0])
    if nlem != memory.shape[0]:
        raise ValueError(f"{where}: nLem={nlem} but memory has {memory.shape[0]} rows")
    return params, memory, vals


def _check_tm(where, T, momentum):
    if T <= 0:
        raise ValueError(f"{where}.params: T must be > 0, got {T}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{where}.params: momentum must be in [0, 1), got {momentum}")


def _nce_average(obj, where):
    params, memory, (K, T, Z, momentum) = _buffers(obj, where, 4, ("K", "T", "Z", "momentum"))
    _check_tm(where, T, momentum)
    if K != int(K) or K < 1 or int(K) != obj.__dict__.get("K", int(K)):
        raise ValueError(f"{where}: K must be a positive integer matching params[0], got K={obj.__dict__.get('K')}, "
                         f"params[0]={K}")
    if Z == 0:
        raise ValueError(f"{where}.params: Z is 0 (expected -1, not estimated yet, or a positive value)")
    _check_uniform(obj, memory.shape[0], where)
    return NCEAverage.from_buffers(params, memory)


def _linear_average(obj, where):
    params, memory, (T, momentum) = _buffers(obj, where, 2, ("T", "momentum"))
    _check_tm(where, T, momentum)
    return LinearAverage.from_buffers(params, memory)


def _check_uniform(obj, N, where):
    """The drop-in draws negatives uniformly: the original's unigrams and alias table must be uniform."""
    uni = obj.__dict__.get("unigrams")
    if isinstance(uni, torch.Tensor) and uni.numel() > 0 and not bool((uni == uni.reshape(-1)[0]).all()):
        raise ValueError(f"{where}.unigrams is not uniform: the drop-in draws negatives uniformly")
    alias = obj.__dict__.get("multinomial")
    if isinstance(alias, _OriginalAliasMethod):
        prob, table = alias.__dict__.get("prob"), alias.__dict__.get("alias")
        if isinstance(prob, torch.Tensor) and isinstance(table, torch.Tensor) and prob.numel() == N:
            # the probability of drawing i: (prob[i] + sum of (1 - prob[j]) over j aliased to i) / N
            p = prob.double().cpu().clone()
            p.index_add_(0, table.long().cpu().clamp(0, N - 1), 1 - prob.double().cpu())
            if float((p / N - 1.0 / N).abs().max()) > 1e-4 / N:
                raise ValueError(f"{where}.multinomial draws non-uniformly: the drop-in draws negatives uniformly")
