"""What a run is built from: the process group (``--bank replicated|sharded``), the loss module
that owns the memory bank, the output folder and the thread limit."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from ..modules import InstDiscLoss
from ..ops import z_policy
from .config import BANK_DTYPES, ConfigError, parse_z


@contextlib.contextmanager
def thread_limit(n):
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

        from ..distributed import DistributedInstDiscLoss
        gen = torch.Generator(device=device)
        gen.manual_seed(args.seed + 1 + 1_000_003 * dist.get_rank())   # per-rank negatives
        z = parse_z(args.z or z_policy.DEFAULT_POLICY)
        crit = DistributedInstDiscLoss(
            num_samples, args.feat_dim, mode=args.bank, num_negatives=0 if args.loss == "softmax" else args.nce_k,
            temperature=args.nce_t, momentum=args.nce_m, z="first-batch" if z == "batch" else z,
            z_ema=0.99 if args.z_ema is None else args.z_ema, proximal=args.proximal,
            bank_dtype=BANK_DTYPES[args.bank_dtype],
            loss_type="infonce" if args.loss == "infonce" else "nce", backend=args.backend, device=device,
            generator=gen, negatives=args.negatives or "per-sample")
        if z == "batch" and args.loss == "nce":
            crit.register_forward_pre_hook(z_policy.per_batch_hook)
        return crit
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed + 1)
    return InstDiscLoss(     # flags left unset stay None: InstDiscLoss raises for one that does not apply
        num_samples, args.feat_dim, num_negatives=None if args.loss == "softmax" else args.nce_k,
        temperature=args.nce_t, momentum=args.nce_m, z=None if args.z is None else parse_z(args.z),
        z_ema=args.z_ema, z_every=args.z_every, proximal=args.proximal, bank_dtype=BANK_DTYPES[args.bank_dtype],
        loss_type=args.loss, backend=args.backend, device=device, generator=gen, negatives=args.negatives)


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


def fresh_out_dir():
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}-{n}"
    return out
