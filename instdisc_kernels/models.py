"""Backbones of the reference trainer, each ending in a D-dim linear head and L2 normalisation.

``resnet18`` / ``resnet50``: torchvision ResNets (ImageNet stem) with fc -> D.
``resnet18-cifar`` / ``resnet50-cifar``: the same with a 3x3 stride-1 stem and no max-pool.
``smallcnn``: four 3x3 conv layers for tiny images (the digits demo on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("smallcnn", "resnet18", "resnet50", "resnet18-cifar", "resnet50-cifar")


class EmbeddingNet(nn.Module):
    """``backbone`` then L2 normalisation (in float32, also under autocast)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.dim = dim

    def forward(self, x):
        return F.normalize(self.backbone(x).float(), dim=1)


def _conv_bn(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels=1, dim=128, width=32):
    """conv-conv-(stride 2)conv-conv, 2x2 average pool, linear head: works from 4x4 inputs up."""
    return nn.Sequential(
        *_conv_bn(in_channels, width), *_conv_bn(width, width),
        *_conv_bn(width, 2 * width, stride=2), *_conv_bn(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, dim),
    )


def _resnet(depth, dim, in_channels, cifar_stem):
    from torchvision import models

    net = {18: models.resnet18, 50: models.resnet50}[depth](weights=None, num_classes=dim)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


def build_model(arch: str, *, dim: int = 128, in_channels: int = 3) -> EmbeddingNet:
    """An :class:`EmbeddingNet` mapping images to unit-length ``dim``-vectors."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if arch == "smallcnn":
        backbone = small_cnn(in_channels, dim)
    elif arch in ("resnet18", "resnet50", "resnet18-cifar", "resnet50-cifar"):
        backbone = _resnet(int(arch[6:8]), dim, in_channels, arch.endswith("-cifar"))
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return EmbeddingNet(backbone, dim)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile (whose state_dict keys carry no prefix)."""
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def extract_features(model: nn.Module, dataset, *, batch_size=256, device="cpu", amp=False, workers=0,
                     progress=True, desc="features"):
    """(features N x D float32 L2-normalised, labels N int64), both on ``device``, of ``dataset``
    (items ``(image, target, index)``) in dataset order: evaluate.extract_features over a
    DataLoader, in eval mode (the model's train/eval mode is restored)."""
    from .evaluate import extract_features as _extract

    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    return _extract(model, loader, device=device, progress=progress, desc=desc, amp=amp, by_index=False,
                    out_device=device)
