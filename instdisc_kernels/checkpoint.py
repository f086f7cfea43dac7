"""Atomic checkpoints and RNG-state capture for the reference trainer.

``save_checkpoint`` writes to a temporary file in the target folder, fsyncs it
and renames it over the old file (``os.replace`` is atomic on POSIX and
Windows), so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or incompatible with the run."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format_version=FORMAT_VERSION), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError when it cannot."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        # our own file: it holds numpy / python RNG states, so not weights_only
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
        raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} is not an instdisc-train checkpoint (format {FORMAT_VERSION})")
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
