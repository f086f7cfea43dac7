"""The trainer's configuration: per-dataset defaults, the checks of the parsed flags, and the
two errors reported without a traceback (ConfigError, TrainingError)."""
from __future__ import annotations

import math
import re
import sys

import torch

from .. import _backend
from ..ops import z_policy

BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dataset-dependent defaults (None on the command line means "take it from here").
# cifar10/fake/imagefolder follow the paper and lemniscate (docs/method.md#notation); digits is tuned for a quick CPU demo.
DEFAULTS = {
    "digits": dict(arch="smallcnn", epochs=30, batch_size=128, lr=0.003, weight_decay=5e-4, lr_steps=[25],
                   loss="softmax", nce_k=1024, nce_t=0.1, workers=0, threads=1),
    "mnist5k": dict(arch="smallcnn", epochs=30, batch_size=128, lr=0.003, weight_decay=5e-4, lr_steps=[25],
                    loss="softmax", nce_k=1024, nce_t=0.1, workers=0, threads=2),
    "cifar10": dict(arch="resnet18-cifar", epochs=200, batch_size=128, lr=0.03, weight_decay=5e-4,
                    lr_steps=[120, 160], loss="nce", nce_k=4096, nce_t=0.1, workers=4),
    "fake": dict(arch="resnet18-cifar", epochs=200, batch_size=128, lr=0.03, weight_decay=5e-4,
                 lr_steps=[120, 160], loss="nce", nce_k=4096, nce_t=0.1, workers=0),
    "imagefolder": dict(arch="resnet18", epochs=200, batch_size=256, lr=0.03, weight_decay=1e-4,
                        lr_steps=[120, 160], loss="nce", nce_k=4096, nce_t=0.07, workers=8),
}


class ConfigError(Exception):
    """An inconsistent run configuration (reported without a traceback)."""


class TrainingError(Exception):
    """The run cannot go on (it diverged, or the loss failed): reported without a traceback."""


def fill_defaults(args):
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    if args.knn_t is None:
        args.knn_t = args.nce_t
    if args.baselines is None:
        args.baselines = args.dataset in ("digits", "fake")
    for name, default in LOSS_FLAG_DEFAULTS.items():   # only where they apply: InstDiscLoss raises for the others
        if getattr(args, name) is None and loss_flag_applies(args, name):
            setattr(args, name, default)
    return args


def check_args(args):
    """ConfigError naming the flag for a value out of range."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for name in ("epochs", "batch_size", "feat_dim", "knn_k", "probe_max_train"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("limit_train", "limit_test", "image_size", "threads"):
        v = getattr(args, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    for name in ("lr", "nce_t", "knn_t"):
        v = getattr(args, name)
        need(math.isfinite(v) and v > 0, f"--{name.replace('_', '-')} must be a positive number, got {v}")
    need(args.nce_k >= 1, f"--nce-k must be >= 1, got {args.nce_k}")
    need(args.z_ema is None or 0 < args.z_ema < 1, f"--z-ema must be in (0, 1), got {args.z_ema}")
    need(args.z_every is None or args.z_every >= 1, f"--z-every must be >= 1, got {args.z_every}")
    check_flags_apply(args)
    need(0 <= args.nce_m < 1, f"--nce-m must be in [0, 1), got {args.nce_m}")
    need(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.proximal >= 0, f"--proximal must be >= 0, got {args.proximal}")
    need(0 < args.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {args.lr_gamma}")
    need(all(s >= 1 for s in args.lr_steps), f"--lr-steps must be epochs >= 1, got {args.lr_steps}")
    z = parse_z(args.z or z_policy.DEFAULT_POLICY)
    need(args.bank == "local" or not isinstance(z, str) or z in z_policy.DISTRIBUTED_POLICIES,
         f"--z {z} is not available with --bank {args.bank}; use one of "
         f"{', '.join(z_policy.DISTRIBUTED_POLICIES)} or a number")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")


LOSS_FLAG_DEFAULTS = {"z": z_policy.DEFAULT_POLICY, "z_ema": 0.99, "z_every": z_policy.DEFAULT_EVERY,
                      "negatives": "per-sample"}
FLAG_OF = {"z": "--z", "z_ema": "--z-ema", "z_every": "--z-every", "negatives": "--negatives"}


def loss_flag_applies(args, name):
    """Whether --z / --z-ema / --z-every / --negatives is used by this run's --loss (and --z)."""
    z = args.z if args.z is not None else z_policy.DEFAULT_POLICY
    return {"z": args.loss == "nce", "z_ema": args.loss == "nce" and z in ("ema", "ema-bc"),
            "z_every": args.loss == "nce" and z == "exact", "negatives": args.loss != "softmax"}[name]


def check_flags_apply(args):
    """ConfigError naming a flag that this run's --loss / --z would not use (InstDiscLoss's rule)."""
    from ..modules import _check_applicable
    if args.bank != "local":
        return
    try:
        _check_applicable(args.loss, z=None if args.z is None else parse_z(args.z), z_ema=args.z_ema,
                          z_every=args.z_every, negatives=args.negatives)
    except ValueError as e:
        msg = re.sub(r"(?<![\w])(z|z_ema|z_every|negatives)=", lambda m: FLAG_OF[m.group(1)] + " ", str(e))
        raise ConfigError(f"with --loss {args.loss}: {msg}") from None


def parse_z(z):
    if z in z_policy.Z_POLICIES:
        return z
    try:
        v = float(z)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"--z must be one of {', '.join(z_policy.Z_POLICIES)} or a positive number, got {z!r}")
    return v


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_backend(args, device):
    """ConfigError when --backend cannot run this run's loss on ``device``."""
    b = args.backend
    if b in _backend.DEPRECATED:
        print(f"instdisc-train: warning: --backend {b} is deprecated and will be removed in the next release: "
              f"use --backend {_backend.DEPRECATED[b]}", file=sys.stderr)
    if b in ("triton", "cuda") and device.type != "cuda":
        why = "no CUDA device is available" if not torch.cuda.is_available() else "this run is on --device cpu"
        raise ConfigError(f"--backend {b} runs its kernels on a CUDA GPU, but {why}: use --backend auto, cpu or "
                          f"eager")
    try:
        run_table(args).select(b, device)
    except ValueError as e:
        raise ConfigError(f"--backend {b} with --loss {args.loss}: {e}") from None


def run_table(args):
    """The backend table (ops/*.py TABLE) of this run's loss."""
    from ..ops import nce, nce_shared, softmax
    if args.loss == "softmax":
        return softmax.TABLE
    return nce_shared.TABLE if getattr(args, "negatives", "per-sample") == "shared" else nce.TABLE
