"""lemniscate.pytorch's own modules, written out eagerly from their description
(docs/method.md, docs/lemniscate.md), as the baseline of the drop-in providers: the ops
"lemniscate_nce" (NCEAverage + NCECriterion, K negatives) and "lemniscate_linear"
(LinearAverage + nn.CrossEntropyLoss). A step is the training step of a
lemniscate script: ``out = lemniscate(x, y)``, ``loss = criterion(out, y)``,
``loss.backward()`` (the bank is updated in backward).

The originals' arithmetic is kept: the alias-method draw of the negatives (uniform
table: prob 1, alias 0), index_select of the B x (K+1) x D rows, bmm, in-place /T,
exp, /Z; backward scales the incoming gradient by P / T, bmm with the saved rows,
and updates the bank from the saved positive rows. LinearAverage divides its
output by T in place and, in backward, the incoming gradient by T in place (as the
original does), then one mm with the bank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion

EPS = 1e-7


class AliasTable:
    """The original's alias sampler for uniform unigrams: prob all 1, alias all 0."""

    def __init__(self, n, device):
        self.prob = torch.ones(n, device=device)
        self.alias = torch.zeros(n, dtype=torch.long, device=device)

    def draw(self, n):
        kk = torch.zeros(n, dtype=torch.long, device=self.prob.device).random_(0, self.alias.shape[0])
        b = torch.bernoulli(self.prob.index_select(0, kk))
        return kk * b.long() + self.alias.index_select(0, kk) * (1 - b).long()


class _NCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, idx, params):
        K, T, Z, m = (float(v) for v in params)
        B, D = x.shape
        idx.select(1, 0).copy_(y)
        weight = torch.index_select(memory, 0, idx.view(-1)).view(B, int(K) + 1, D)
        out = torch.bmm(weight, x.detach().view(B, D, 1))
        out.div_(T).exp_()
        if Z < 0:
            params[2] = out.mean() * memory.shape[0]
            Z = float(params[2])
        out.div_(Z)
        out = out.view(B, int(K) + 1)
        ctx.save_for_backward(x, memory, y, weight, out, params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, memory, y, weight, out, params = ctx.saved_tensors
        T, m = float(params[1]), float(params[3])
        B, D = x.shape
        g = (grad_out * out).div_(T)
        grad_x = torch.bmm(g.view(B, 1, -1), weight).view(B, D)
        pos = weight.select(1, 0).mul_(m).add_(x.detach() * (1 - m))
        memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return grad_x, None, None, None, None


class OriginalNCEAverage(nn.Module):
    def __init__(self, memory, K, T, Z, momentum):
        super().__init__()
        self.nLem, self.K = memory.shape[0], K
        self.multinomial = AliasTable(self.nLem, memory.device)
        self.register_buffer("params", torch.tensor([K, T, Z, momentum], device=memory.device))
        self.register_buffer("memory", memory)

    def forward(self, x, y):
        idx = self.multinomial.draw(x.shape[0] * (self.K + 1)).view(x.shape[0], -1)
        return _NCEFunction.apply(x, y, self.memory, idx, self.params)


class OriginalNCECriterion(nn.Module):
    def __init__(self, nLem):
        super().__init__()
        self.nLem = nLem

    def forward(self, x, targets):
        B, K = x.shape[0], x.shape[1] - 1
        c = K / float(self.nLem) + EPS
        p0 = x.select(1, 0)
        ln_pmt = torch.div(p0, p0.add(c)).log_()
        pon_div = x.narrow(1, 1, K).add(c)
        ln_pon = torch.div(pon_div.clone().fill_(K / float(self.nLem)), pon_div).log_()
        return -(ln_pmt.sum(0) + ln_pon.view(-1, 1).sum(0)) / B


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, params):
        out = torch.mm(x.detach(), memory.t())
        out.div_(float(params[0]))
        ctx.save_for_backward(x, memory, y, params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, memory, y, params = ctx.saved_tensors
        T, m = float(params[0]), float(params[1])
        grad_out.div_(T)                       # in place, as the original does
        grad_x = torch.mm(grad_out, memory)
        pos = memory.index_select(0, y).mul_(m).add_(x.detach() * (1 - m))
        memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return grad_x, None, None, None


class OriginalLinearAverage(nn.Module):
    def __init__(self, memory, T, momentum):
        super().__init__()
        self.nLem = memory.shape[0]
        self.register_buffer("params", torch.tensor([T, momentum], device=memory.device))
        self.register_buffer("memory", memory)

    def forward(self, x, y):
        return _LinearFunction.apply(x, y, self.memory, self.params)


# --------------------------------------------------------------------------- #
# Steps                                                                        #
# --------------------------------------------------------------------------- #
def modules(case, provider, memory, z, momentum):
    """(lemniscate module, criterion) of the original ("eager") or the drop-in (fused-<backend>)."""
    T, N = case.temperature, case.N
    if case.op == "lemniscate_nce":
        if provider == "eager":
            return OriginalNCEAverage(memory, case.K, T, z, momentum), OriginalNCECriterion(N)
        backend = provider.split("-", 1)[1]
        params = torch.tensor([case.K, T, z, momentum], device=memory.device)
        return NCEAverage.from_buffers(params, memory, backend=backend), NCECriterion(N)
    criterion = lambda out, y: F.cross_entropy(out, y)          # noqa: E731
    if provider == "eager":
        return OriginalLinearAverage(memory, T, momentum), criterion
    return LinearAverage.from_buffers(torch.tensor([T, momentum], device=memory.device), memory), criterion


def step(case, provider, g, momentum, sync):
    lem, crit = modules(case, provider, g["memory"], g.get("z", -1.0), momentum)
    x, y = g["x"], g["y"]

    def run():
        x.grad = None
        out = lem(x, y)
        crit(out, y).backward()
        sync()
    return run
