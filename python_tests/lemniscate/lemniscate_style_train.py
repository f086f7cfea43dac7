"""A training script in the shape of lemniscate.pytorch's cifar.py, with only the
import line changed to the drop-ins (used by test_lemniscate_script.py).

    python python_tests/lemniscate/lemniscate_style_train.py --nce-k 16 --epochs 2 --ckpt /tmp/ckpt.t7
    python python_tests/lemniscate/lemniscate_style_train.py --nce-k 16 --epochs 1 --resume /tmp/ckpt.t7 --ckpt /tmp/ckpt2.t7

A tiny linear "net" on random data stands in for the ResNet; the data set returns
(input, target, index) like lemniscate's CIFAR10Instance. Each epoch reseeds
torch, so a resumed run repeats the epochs of an uninterrupted one exactly.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

# from lib.NCEAverage import NCEAverage; from lib.NCECriterion import NCECriterion; from lib.LinearAverage import LinearAverage
from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion


class Net(nn.Module):
    def __init__(self, in_dim, low_dim):
        super().__init__()
        self.fc = nn.Linear(in_dim, low_dim)

    def forward(self, x):
        return F.normalize(self.fc(x), dim=1)


class Instances(torch.utils.data.Dataset):
    def __init__(self, n, in_dim):
        g = torch.Generator().manual_seed(1234)
        self.data = torch.randn(n, in_dim, generator=g)
        self.targets = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, index):
        return self.data[index], self.targets[index], index


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--lr", default=0.03, type=float)
    p.add_argument("--nce-k", default=16, type=int)
    p.add_argument("--nce-t", default=0.1, type=float)
    p.add_argument("--nce-m", default=0.5, type=float)
    p.add_argument("--low-dim", default=8, type=int)
    p.add_argument("--ndata", default=40, type=int)
    p.add_argument("--batch-size", default=8, type=int)
    p.add_argument("--epochs", default=2, type=int)
    p.add_argument("--two-views", action="store_true", help="two noisy views per image before one backward")
    p.add_argument("--resume", default="")
    p.add_argument("--ckpt", default="")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    torch.manual_seed(0)
    trainset = Instances(args.ndata, 12)
    ndata = len(trainset)
    net = Net(12, args.low_dim)
    if args.nce_k > 0:
        lemniscate = NCEAverage(args.low_dim, ndata, args.nce_k, args.nce_t, args.nce_m)
        criterion = NCECriterion(ndata)
    else:
        lemniscate = LinearAverage(args.low_dim, ndata, args.nce_t, args.nce_m)
        criterion = nn.CrossEntropyLoss()
    start_epoch = 0
    if args.resume:
        checkpoint = torch.load(args.resume)                    # plain torch.load: weights_only=True
        net.load_state_dict(checkpoint["net"])
        lemniscate = checkpoint["lemniscate"]
        start_epoch = checkpoint["epoch"] + 1
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if args.resume:                                             # as main.py (cifar.py does not save it)
        optimizer.load_state_dict(checkpoint["optimizer"])
    losses = []
    for epoch in range(start_epoch, start_epoch + args.epochs):
        torch.manual_seed(100 + epoch)
        loader = torch.utils.data.DataLoader(trainset, batch_size=args.batch_size, shuffle=True)
        for inputs, _targets, indexes in loader:
            optimizer.zero_grad()
            if args.two_views:
                f1 = net(inputs + 0.1 * torch.randn_like(inputs))
                f2 = net(inputs + 0.1 * torch.randn_like(inputs))
                loss = criterion(lemniscate(f1, indexes), indexes) + criterion(lemniscate(f2, indexes), indexes)
            else:
                features = net(inputs)
                outputs = lemniscate(features, indexes)
                loss = criterion(outputs, indexes)
            loss.backward()
            optimizer.step()
            losses.append(loss.data[0].item() if args.nce_k > 0 else loss.item())   # loss.data[0]-era code
        if args.ckpt:
            torch.save({"net": net.state_dict(), "lemniscate": lemniscate, "acc": 0.0, "epoch": epoch,
                        "optimizer": optimizer.state_dict()}, args.ckpt)
    return {"losses": losses, "net": net, "lemniscate": lemniscate, "criterion": criterion}


if __name__ == "__main__":
    out = main()
    print("final loss", out["losses"][-1])
