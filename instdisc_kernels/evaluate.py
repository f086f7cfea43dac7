"""``evaluate_knn``: the weighted-kNN evaluation of lemniscate's test.py (docs/method.md#evaluation-weighted-k-nearest-neighbours)
for a model and two data loaders.

Loaders yield ``(image, target, index)`` triples (lemniscate's instance
datasets) or ``(image, target)`` pairs. With an index, a sample's feature and
label go to row ``index`` (the memory bank's row order); without one, rows
follow the loader order.
"""
from __future__ import annotations

import torch

from .ops.knn import knn_accuracy


def _unpack(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("loaders must yield (image, target) or (image, target, index) batches")
    x, y = batch[0], batch[1]
    idx = batch[2] if len(batch) == 3 else None
    return x, torch.as_tensor(y), None if idx is None else torch.as_tensor(idx)


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)


def _place(rows, idx_list, n_seen, what):
    """Stack per-batch rows, placed at their dataset indices when the loader gives them."""
    flat = torch.cat(rows)
    if idx_list is None:
        return flat
    idx = torch.cat(idx_list).long()
    if idx.min() < 0 or idx.unique().numel() != n_seen:
        raise ValueError(f"the {what} loader's indices must be distinct and >= 0")
    out = flat.new_zeros((int(idx.max()) + 1,) + tuple(flat.shape[1:]))
    if out.shape[0] != n_seen:
        raise ValueError(f"the {what} loader's indices must cover 0..{n_seen - 1}")
    out[idx] = flat
    return out


@torch.no_grad()
def extract_features(model, loader, *, device=None, progress=True, desc="features", need_features=True,
                     amp=False, by_index=True, out_device="cpu"):
    """(features (N, D) float32 L2-normalised or None, labels (N,) int64) on ``out_device``.

    With ``by_index`` the rows are in dataset-index order when the loader yields indices
    (each index once, covering 0..N-1); otherwise in loader order. The model runs in eval
    mode (its mode is restored) on ``device``, under bfloat16 autocast with ``amp``."""
    feats, labels, indices = [], [], []
    has_index = None
    was_training = model.training if model is not None else False
    if model is not None and need_features:
        model.eval()
    try:
        for batch in _progress(loader, progress, desc):
            x, y, idx = _unpack(batch)
            if not by_index:
                idx = None
            if has_index is None:
                has_index = idx is not None
            elif has_index != (idx is not None):
                raise ValueError("the loader mixes (image, target) and (image, target, index) batches")
            if need_features:
                if device is not None:
                    x = x.to(device, non_blocking=True)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                    f = model(x)
                feats.append(torch.nn.functional.normalize(f.float(), dim=1).to(out_device))
            labels.append(y.reshape(-1).long().to(out_device))
            if has_index:
                indices.append(idx.reshape(-1).to(out_device))
    finally:
        if model is not None and need_features:
            model.train(was_training)
    if not labels:
        raise ValueError(f"the {desc} loader is empty")
    n = sum(lab.shape[0] for lab in labels)
    idx_list = indices if has_index else None
    F = _place(feats, idx_list, n, desc) if need_features else None
    return F, _place(labels, idx_list, n, desc)


def _bank_tensor(use_bank):
    if isinstance(use_bank, torch.Tensor):
        return use_bank
    mem = getattr(use_bank, "memory", None)
    if isinstance(mem, torch.Tensor):
        return mem
    raise TypeError("use_bank must be None, a (N, D) tensor, or an object with a .memory tensor "
                    f"(MemoryBank, InstDiscLoss, NCEAverage, LinearAverage), got {type(use_bank).__name__}")


def _model_device(model):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_knn(model: torch.nn.Module, train_loader: torch.utils.data.DataLoader,
                 test_loader: torch.utils.data.DataLoader, *, k: int = 200,
                 temperature: float = 0.07, use_bank: torch.Tensor | torch.nn.Module | None = None,
                 device: torch.device | str | None = None, progress: bool = True,
                 num_classes: int | None = None) -> tuple[float, float]:
    """Weighted-kNN (top-1, top-5) test accuracy in percent (lemniscate's kNN).

    Args:
        model: maps an image batch to (B, D) features (normalised here).
        train_loader: the training set, ideally with the *test* transform; gives the
            train labels, and the train features when ``use_bank`` is None.
        test_loader: the test set (queries).
        k, temperature: neighbours and sigma (docs/method.md#notation: k = 200, sigma = T).
        use_bank: None to recompute the train features with ``model``; or the memory
            bank (a (N, D) tensor or an object with ``.memory``, e.g. InstDiscLoss),
            used as the train features as lemniscate does (row i = dataset index i).
        device: where the model runs and the kNN is computed (default: the model's).
        progress: tqdm progress bars while extracting features.
    """
    if device is None:
        device = _model_device(model)
    device = torch.device(device)
    if use_bank is None:
        train_f, train_y = extract_features(model, train_loader, device=device, progress=progress, desc="train")
    else:
        train_f = _bank_tensor(use_bank).detach()
        targets = getattr(getattr(train_loader, "dataset", None), "targets", None)
        if targets is not None:                     # dataset order = bank row order
            train_y = torch.as_tensor(targets).reshape(-1).long()
        else:
            _, train_y = extract_features(None, train_loader, progress=progress, desc="train labels",
                                          need_features=False)
        if train_y.shape[0] != train_f.shape[0]:
            raise ValueError(f"the memory bank has {train_f.shape[0]} rows but the train loader "
                             f"has {train_y.shape[0]} samples")
    test_f, test_y = extract_features(model, test_loader, device=device, progress=progress, desc="test")
    return knn_accuracy(test_f.to(device), test_y.to(device), train_f.to(device), train_y.to(device), k=k,
                        temperature=temperature, num_classes=num_classes)
