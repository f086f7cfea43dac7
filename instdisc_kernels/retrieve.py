"""``instdisc-retrieve``: draw the retrieval grid (test queries and their nearest
training images) from a checkpoint written by ``instdisc-train``.

    instdisc-retrieve --checkpoint runs/X/checkpoint.pt --out grid.png
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, trainer_checkpoint_problems
from .data import DataError, build_data
from .models import build_model, extract_features
from .plots import plot_retrieval


def pick_queries(num_test, num_queries, seed=0):
    """Fixed, seeded choice of query positions (does not touch the global RNG)."""
    n = min(num_queries, num_test)
    return np.sort(np.random.RandomState(seed).permutation(num_test)[:n]).tolist()


def nearest(queries, train_feats, k):
    """(Q, k) indices of the k most cosine-similar training rows, nearest first."""
    sim = queries.float() @ train_feats.float().t()
    return torch.topk(sim, min(k, train_feats.shape[0]), dim=1).indices.cpu()


def draw_retrieval(bundle, train_feats, test_feats, path, *, num_queries=8, k=10, seed=0, title=None):
    """Write the grid for ``num_queries`` test images of ``bundle`` to ``path``; returns the
    fraction of the drawn neighbours that share their query's class."""
    qs = pick_queries(len(bundle.test), num_queries, seed)
    nn_idx = nearest(test_feats[qs], train_feats, k)
    q_lab = [bundle.test.targets[i] for i in qs]
    n_lab = [[bundle.train.targets[j] for j in row.tolist()] for row in nn_idx]
    plot_retrieval([bundle.display_test(i) for i in qs], q_lab,
                   [[bundle.display_train(j) for j in row.tolist()] for row in nn_idx], n_lab, path, title=title)
    hits = sum(int(lab == ql) for ql, row in zip(q_lab, n_lab) for lab in row)
    return hits / max(1, sum(len(r) for r in n_lab))


def _bank(ck, path):
    """The memory bank of a checkpoint: in it (--bank local) or in bank/ next to it."""
    if ck["criterion"] is not None:
        return ck["criterion"]["bank.memory"]
    from .distributed.checkpoint import read_bank
    return read_bank(os.path.join(os.path.dirname(os.path.abspath(path)), "bank"), ck.get("bank_meta"))[0]


def build_parser():
    p = argparse.ArgumentParser(
        prog="instdisc-retrieve",
        description="Draw a retrieval grid (test queries and their nearest training images, green frame = same "
                    "class, red = other) from an instdisc-train checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by instdisc-train")
    p.add_argument("--out", default="retrieval.png", help="output png (default: %(default)s)")
    p.add_argument("--queries", type=int, default=8, help="number of test images, one per row (default: 8)")
    p.add_argument("--neighbours", type=int, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query choice (default: 0)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute training features with the test transform instead of using the memory bank")
    p.add_argument("--data-root", default=None, help="override the dataset root stored in the checkpoint")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.queries < 1 or a.neighbours < 1 or a.batch_size < 1:
        p.error("--queries, --neighbours and --batch-size must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    try:
        ck = load_checkpoint(a.checkpoint)
        problems = trainer_checkpoint_problems(ck)
        if problems:
            raise CheckpointError(f"cannot use {a.checkpoint}: " + "; ".join(problems))
        args = ck["args"]
        bundle = build_data(args["dataset"], root=a.data_root or args["data_root"], download=False,
                            image_size=args["image_size"], limit_train=args["limit_train"],
                            limit_test=args["limit_test"])
        if bundle.num_train != ck["num_samples"]:
            raise CheckpointError(f"the checkpoint's memory bank has {ck['num_samples']} rows but the dataset "
                                  f"now has {bundle.num_train} training images")
        model = build_model(args["arch"], dim=args["feat_dim"], in_channels=bundle.in_channels).to(device)
        try:
            model.load_state_dict(ck["model"])
            bank = None if a.recompute else _bank(ck, a.checkpoint)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"cannot use {a.checkpoint}: {e}") from None
    except (CheckpointError, DataError) as e:
        print(f"instdisc-retrieve: error: {e}", file=sys.stderr)
        return 2
    progress = not a.no_progress
    if a.recompute:
        train_feats, _ = extract_features(model, bundle.train_plain, batch_size=a.batch_size, device=device,
                                          progress=progress, desc="train features")
    else:
        train_feats = bank.to(device).float()
        train_feats = torch.nn.functional.normalize(train_feats, dim=1)
    qs = pick_queries(len(bundle.test), a.queries, a.seed)
    sub = torch.utils.data.Subset(bundle.test, qs)
    q_feats, _ = extract_features(model, sub, batch_size=a.batch_size, device=device, progress=progress,
                                  desc="query features")
    test_feats = torch.zeros(len(bundle.test), q_feats.shape[1], device=device)
    test_feats[qs] = q_feats
    prec = draw_retrieval(bundle, train_feats, test_feats, a.out, num_queries=a.queries, k=a.neighbours,
                          seed=a.seed, title=f"{args['dataset']}, epoch {ck['epoch']}: queries and their "
                                             f"{a.neighbours} nearest training images (green = same class)")
    print(f"wrote {a.out}: {len(qs)} queries x {a.neighbours} neighbours, {100 * prec:.1f}% of neighbours "
          f"share the query's class ({'recomputed features' if a.recompute else 'memory bank'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
