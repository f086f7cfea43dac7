"""The run: ``run`` (resume merge, defaults, checks) and ``_train`` (data, model, optimiser, the
epoch loop with its kNN evaluation and checkpoint, the final evaluation), ``train_one_epoch`` and
the divergence checks that name what went wrong (``check_weights``, ``diagnose``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch

from ..checkpoint import (
    CheckpointError,
    checksum_problems,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    trainer_checkpoint_problems,
)
from ..data import build_data
from ..models import build_model, count_parameters, extract_features, unwrap
from ..plots import plot_curves
from .components import build_criterion, fresh_out_dir, init_distributed, prepare_out, thread_limit
from .config import (
    LOSS_FLAG_DEFAULTS,
    ConfigError,
    TrainingError,
    check_args,
    check_backend,
    fill_defaults,
    loss_flag_applies,
    resolve_device,
    run_table,
)
from .report import (
    append_metrics,
    bank_features,
    distributed_knn,
    evaluate_baselines,
    final_evaluation,
    knn_eval,
    summary,
    write_metrics,
)
from .resume import check_compatible, rank_rng_streams, restore


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
        for name in LOSS_FLAG_DEFAULTS:                  # older checkpoints stored every default
            if name not in given and not loss_flag_applies(argparse.Namespace(**merged), name):
                merged[name] = None
        merged["resume"] = args.resume
        merged["out"] = given.get("out")             # default: the checkpoint's folder
        args = argparse.Namespace(**merged)
    fill_defaults(args)
    check_args(args)
    with thread_limit(args.threads):
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
    out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else fresh_out_dir())
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
        write_metrics(os.path.join(out, "metrics.jsonl"), history)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    net = torch.compile(train_model) if args.compile else train_model
    with warnings.catch_warnings():    # a deprecated --backend name warned once already, at the check
        warnings.simplefilter("ignore", DeprecationWarning)
        be = run_table(args).select(args.backend, device)
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
            from ..distributed import save_sharded
            save_sharded(criterion, os.path.join(out, "bank"), meta={"epoch": epoch})
            streams = rank_rng_streams(criterion, world)
        if not main_rank:
            continue
        history.append(rec)
        append_metrics(os.path.join(out, "metrics.jsonl"), rec)
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


def train_one_epoch(model, criterion, optimizer, loader, device, args, epoch):
    """Mean loss over the epoch's images and the number of images seen."""
    from tqdm.auto import tqdm

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
    return total / max(seen, 1), seen


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
