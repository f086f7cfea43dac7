"""Atomic, checksummed checkpoints and RNG-state capture for the reference trainer.

``save_checkpoint`` writes to a temporary file in the target folder, fsyncs it
and renames it over the old file (``os.replace`` is atomic on POSIX and
Windows), so a crash while saving leaves the previous checkpoint intact (and a
``.tmp-<name>-*`` file, which ``remove_stale_temp_files`` deletes on the next
start). Every top-level entry is stored with the SHA-256 of its contents
(tensor bytes, dtypes, shapes and the plain Python values around them), and
``load_checkpoint`` refuses a file whose contents no longer match.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKSUMS = "checksums"         # {top-level key: sha256 hex} (checkpoints written before it have none)


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or incompatible with the run."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = dict(state, format_version=FORMAT_VERSION)
    state.pop(CHECKSUMS, None)
    state[CHECKSUMS] = checksums(state)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
        remove_stale_temp_files(path)           # those of an earlier save that was killed
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:                                   # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _temp_prefix(path):
    return ".tmp-" + os.path.basename(path) + "-"


def remove_stale_temp_files(path: str) -> list:
    """Delete the temporary files a process killed inside ``save_checkpoint(..., path)`` left
    next to ``path``; returns their names. Call it before this process saves there."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), _temp_prefix(path)
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _feed(h, obj):
    """Hash ``obj`` canonically: the same value gives the same digest after a save/load round trip."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, float):
        h.update(f"F{float(obj).hex()}".encode())
    elif isinstance(obj, (str, bytes)):
        b = obj.encode() if isinstance(obj, str) else obj
        h.update(f"{'S' if isinstance(obj, str) else 'B'}{len(b)}:".encode())
        h.update(b)
    else:                                   # int, bool, None, numpy scalars, dtypes
        h.update(f"O{type(obj).__name__}:{obj!r}".encode())


def digest(obj) -> str:
    """SHA-256 hex of ``obj`` (tensors, arrays and plain Python containers), canonical."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def checksums(state: dict) -> dict:
    """{key: digest(state[key])} for every top-level entry but the checksums."""
    return {k: digest(v) for k, v in state.items() if k != CHECKSUMS}


def checksum_problems(state: dict) -> list:
    """What no longer matches the checksums stored at save time (empty: intact, or saved
    before checkpoints had checksums)."""
    want = state.get(CHECKSUMS)
    if want is None:
        return []
    if not isinstance(want, dict):
        return [f"its {CHECKSUMS!r} entry is not a dict"]
    got = checksums({k: state[k] for k in want if k in state})
    missing = [k for k in want if k not in state]
    bad = [k for k in want if k in state and got[k] != want[k]]
    problems = []
    if bad:
        problems.append(f"the contents of {', '.join(map(repr, bad))} do not match the checksum stored when it was "
                        f"saved: the file is corrupt (damaged or modified after it was written)")
    if missing:
        problems.append(f"entries {', '.join(map(repr, missing))} were removed after it was saved")
    return problems


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str, map_location="cpu", *, verify=True) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError when it cannot, or
    (``verify``) when its contents fail the checksums stored in it."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        # our own file: it holds numpy / python RNG states, so not weights_only
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} is not an instdisc-train checkpoint (format {FORMAT_VERSION})")
    problems = checksum_problems(state) if verify else []
    if problems:
        raise CheckpointError(f"checkpoint {path!r} failed its checksums: {'; '.join(problems)}; use another "
                              f"checkpoint or start a new run")
    return state


def rng_state() -> dict:
    """Global RNG states: python, numpy, torch CPU and (if present) every CUDA device."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# What instdisc-train stores and needs to resume: entry -> type ("criterion" may also be None:
# a --bank replicated/sharded run keeps its bank in bank/ next to the checkpoint).
TRAINER_ENTRIES = {"epoch": int, "args": dict, "num_samples": int, "feat_dim": int, "model": dict,
                   "criterion": (dict, type(None)), "criterion_generator": torch.Tensor, "optimizer": dict,
                   "scheduler": dict, "rng": dict, "history": list, "baselines": dict}


def _nonfinite_rows(t):
    """(number of rows with a NaN/inf, first such row) of a floating tensor (rows: dim 0)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0, None
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)).all(1)
    n = int(bad.sum())
    return n, (int(bad.nonzero()[0, 0]) if n else None)


def trainer_checkpoint_problems(state: dict) -> list:
    """Why ``state`` cannot resume an instdisc-train run (empty: it can). Covers missing or
    mistyped entries, a memory bank whose shape disagrees with the run it belongs to, and
    NaN/inf in the bank, Z or the network weights."""
    missing = [k for k in TRAINER_ENTRIES if k not in state]
    wrong = [f"{k!r} is a {type(state[k]).__name__}" for k, t in TRAINER_ENTRIES.items()
             if k in state and not isinstance(state[k], t)]
    problems = []
    if missing:
        problems.append(f"it lacks {', '.join(map(repr, missing))} (not a complete instdisc-train checkpoint)")
    if wrong:
        problems.append("of the wrong type: " + ", ".join(wrong))
    if missing or wrong:
        return problems
    n, d = state["num_samples"], state["feat_dim"]
    crit = state["criterion"]
    if crit is not None:
        mem, z = crit.get("bank.memory"), crit.get("z")
        if not isinstance(mem, torch.Tensor):
            problems.append("its criterion has no memory bank ('bank.memory')")
        elif tuple(mem.shape) != (n, d):
            problems.append(f"its memory bank has shape {tuple(mem.shape)}, but the run it belongs to has {n} "
                            f"training images and feature dim {d}: the bank was saved by another run or damaged")
        else:
            bad, first = _nonfinite_rows(mem)
            if bad:
                problems.append(f"its memory bank holds NaN/inf in {bad} of {n} rows (first: row {first}); "
                                f"the run that saved it was already broken, or the file was damaged")
        if not isinstance(z, torch.Tensor) or z.numel() != 1 or not z.is_floating_point():
            problems.append("its criterion has no Z ('z')")
        elif not (torch.isfinite(z).all() and (float(z) > 0 or float(z) == -1.0)):
            problems.append(f"its NCE normaliser Z is {float(z)} (it must be a positive finite number)")
    bad = [k for k, t in state["model"].items() if isinstance(t, torch.Tensor) and _nonfinite_rows(t)[0]]
    if bad:
        problems.append(f"the network weights hold NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                        f"the run that saved it had diverged")
    return problems
