"""Input checks, done once at the public boundary, before any bank row is written.

Every error names the argument. Checks that read tensor values (index range,
NaN/inf) synchronise with a GPU; callers pass ``values=False`` to skip them
(the public ``validate=False``), and they are skipped while torch.compile traces.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _tracing() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_matrix(name, t, *, dim=None):
    check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({'B' if name != 'memory' else 'N'}, D), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float64/bfloat16/float16), got {t.dtype}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has feature dim {t.shape[1]} but the memory bank has dim {dim}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_index_vector(name, t, length, num_rows, *, values=True):
    check_tensor(name, t)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if values:
        check_index_range(name, t, num_rows)


def check_index_range(name, t, num_rows):
    if t.numel() == 0 or _tracing():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, out of range [0, {num_rows})")


def check_finite(name, t):
    if _tracing():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on the same device: {desc}")


def check_temperature(t, name="temperature"):
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {t!r}")


def check_momentum(m, name="momentum"):
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not (0 <= m < 1):
        raise ValueError(f"{name} must be in [0, 1), got {m!r}")


def check_positive_int(v, name):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def check_nonneg_number(v, name):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_z_number(z, name="z"):
    """A float z of nce_loss: finite and representable in float32 (<= 0 means
    "estimate Z from this batch", as documented there)."""
    if not math.isfinite(z) or abs(z) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite float32 number (<= 0: estimate Z from the batch), got {z!r}")


def check_z_tensor(z, name="z"):
    """A 1-element Z state tensor: finite (a value <= 0 means "estimate it")."""
    if _tracing():
        return
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} holds {float(z.reshape(()))!r}: Z must be finite (<= 0: estimate it from the batch)")


def first_nonfinite_row(memory, rows=None):
    """The lowest bank row index (among ``rows``, default all) holding NaN or inf, or None."""
    bad = ~torch.isfinite(memory if rows is None else memory[rows]).all(1)
    if not bool(bad.any()):
        return None
    pos = int(bad.nonzero()[0, 0])
    return pos if rows is None else int(rows[pos])


def check_loss_result(op, memory, loss, grad, *, temperature, z=None, rows=None):
    """After a loss op, before any state or bank row is written: the loss, its gradient
    and the Z it used must be finite. Costs one sum over the (B, D) gradient;
    only the failing case looks further, to say why: a NaN/inf bank row the loss read
    (``rows``: the indices it read, None: every row), or a Z (or loss) that float32
    cannot hold at this temperature."""
    if _tracing():
        return
    zv = None if z is None else float(z.detach().reshape(-1)[0])
    z_ok = zv is None or (math.isfinite(zv) and zv > 0)
    # one pass: a NaN/inf anywhere makes the sum non-finite (a sum that merely overflows is re-checked)
    if z_ok and math.isfinite(float(grad.detach().sum() + loss.detach())):
        return
    if z_ok and bool(torch.isfinite(grad).all() & torch.isfinite(loss)):
        return
    cand = None if rows is None else torch.cat([r.reshape(-1) for r in rows if r is not None]).unique()
    row = first_nonfinite_row(memory, cand)
    if row is None and cand is not None:
        row = first_nonfinite_row(memory)
    if row is not None:
        raise ValueError(f"memory row {row} contains NaN or inf ({op} read it); the bank and Z are left unchanged")
    if not z_ok:
        raise ValueError(f"{op}: Z = N * mean(exp(s / temperature)) is not representable in float32 "
                         f"(got {zv!r}): temperature={temperature!r} is too small for these "
                         f"features (or their norm too large); the bank and Z are left unchanged")
    raise ValueError(f"{op}: the loss or its gradient is not finite: temperature={temperature!r} is too small "
                     f"for these features (or their norm too large); the bank is left unchanged")


def check_features_memory_indices(features, memory, indices, *, values=True):
    """The common (features, memory, indices) triple of the loss ops."""
    check_float_matrix("memory", memory)
    check_float_matrix("features", features, dim=memory.shape[1])
    check_same_device(features=features, memory=memory, indices=indices)
    check_index_vector("indices", indices, features.shape[0], memory.shape[0], values=values)
    if values:
        check_finite("features", features)


def check_loss_config(*, num_samples, dim, num_negatives, temperature, momentum, z, z_ema, proximal,
                      loss_type, backend, bank_dtype):
    """Constructor checks shared by the loss modules; returns the initial Z state
    (-1.0: estimate it on the first batch, for z="first-batch" or "ema")."""
    from ._backend import canonical

    check_positive_int(num_samples, "num_samples")
    check_positive_int(dim, "dim")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"num_negatives must be an integer >= 0, got {num_negatives!r}")
    check_temperature(temperature)
    check_momentum(momentum)
    check_nonneg_number(proximal, "proximal")
    if loss_type not in ("nce", "infonce"):
        raise ValueError(f"loss_type must be 'nce' or 'infonce', got {loss_type!r}")
    if isinstance(z_ema, bool) or not isinstance(z_ema, (int, float)) or not 0 < z_ema < 1:
        raise ValueError(f"z_ema must be in (0, 1), got {z_ema!r}")
    canonical(backend, warn=False)     # ValueError naming the argument when it is not a backend
    if bank_dtype not in FLOAT_DTYPES:
        raise TypeError(f"bank_dtype must be a floating dtype, got {bank_dtype}")
    if isinstance(z, str):
        if z not in ("first-batch", "ema"):
            raise ValueError(f"z must be 'first-batch', 'ema' or a positive float, got {z!r}")
        return -1.0
    check_temperature(z, "z")
    return float(z)
