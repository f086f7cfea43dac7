"""Evaluation and outputs of a run: the weighted kNN of the features and of the memory bank, the
linear probe, the baselines (raw pixels, the untrained network), metrics.jsonl, final.json, the
plots and the summary table."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..models import extract_features
from ..ops.knn import knn_accuracy
from ..plots import plot_curves
from ..retrieve import draw_retrieval


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


def write_metrics(path, history):
    with open(path, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def append_metrics(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


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
