"""The eager shared-negative baseline (bench_baselines.nce_shared_step_eager) computes the
shared-negative NCE step: loss, gradient and bank update against the float64 oracle
reference.shared_nce_forward on the same K rows (fp32 bank)."""
import torch
from bench_baselines import nce_shared_step_eager

from instdisc_kernels import reference as ref


def test_nce_shared_step_eager_matches_oracle():
    for B, K, D, N in ((1, 1, 3, 5), (6, 33, 100, 40)):
        mem = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
        x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
        y = torch.randperm(N)[:B]
        z = 7.0
        torch.manual_seed(11)
        neg = torch.randint(0, N, (K,))
        L, G, _ = ref.shared_nce_forward(x.detach(), mem, y, neg, temperature=0.1, z=z)
        exp_mem = mem.double().clone()
        ref.memory_update_(exp_mem, y, x.detach(), 0.5)
        torch.manual_seed(11)                                      # the baseline draws the same K rows
        loss = nce_shared_step_eager(x, mem, y, K, 0.1, z, 0.5)
        torch.testing.assert_close(loss.double(), L, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), G, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mem.double(), exp_mem, rtol=0, atol=2e-6)
