"""InfoNCE when the positive's softmax probability is within ~1e-7 of 1, in float32.

The gradient is (1/(B T)) [(p0 - 1) V[y] + sum_k p_k V[neg_k]]: tiny, and the naive
"softmax-weighted mean minus V[y]" loses all its digits to cancellation in float32. Every
kernel computes p0 - 1 = -(sum of the negatives' exp) / L from the negatives' sum instead, so
the fp32 result must agree with the float64 oracle (instdisc_kernels/reference.py) to float32
accuracy relative to the gradient's own size. Backends: the C++ CPU kernel and the Triton
kernel (under the interpreter on CPU; python_tests/conftest.py sets TRITON_INTERPRET=1).
"""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import nce

BACKENDS = [b for b in ("cpu", "triton") if nce.TABLE.available(b, torch.device("cpu"))]


def _confident_problem(B=3, K=7, D=100, N=40, T=0.05, seed=0):
    """Unit bank rows; F[b] = V[y[b]]; negatives at cosine ~0.1 from F, so every negative's logit is
    ~18 below the positive's and sum_k exp(t_k - t_0) ~ 1e-7: p0 ~ 1 - 1e-7."""
    g = torch.Generator().manual_seed(seed)
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(B) * 3
    neg = torch.stack([torch.arange(K) + 10 + b for b in range(B)])
    base = mem[y]
    for b in range(B):   # rows of the negatives: 0.1 * F + (orthogonal part), unit norm
        r = torch.randn(K, D, generator=g, dtype=torch.float64)
        r = r - (r @ base[b])[:, None] * base[b]
        r = torch.nn.functional.normalize(r, dim=1)
        mem[neg[b]] = 0.1 * base[b] + (1 - 0.01) ** 0.5 * r
    F = mem[y].clone()
    return F.float(), mem.float(), y, neg, T


def test_problem_is_confident():
    F, mem, y, neg, T = _confident_problem()
    logits = ref.nce_scores(F, mem, ref.index_matrix(y, neg)) / T
    p0 = torch.softmax(logits, 1)[:, 0]
    assert ((1 - p0) > 1e-8).all() and ((1 - p0) < 1e-6).all(), 1 - p0


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_gradient_near_certain_positive(backend):
    F, mem, y, neg, T = _confident_problem()
    want_loss, want_grad, _ = ref.nce_forward(F, mem, y, neg, temperature=T, loss_type="infonce")
    F = F.clone().requires_grad_(True)
    loss = ik.nce_loss(F, mem, y, neg_indices=neg, temperature=T, loss_type="infonce", backend=backend,
                       update_memory=False)
    loss.backward()
    grad = F.grad.double()
    scale = want_grad.abs().max().item()
    assert scale < 1e-4   # the gradient is ~1e-7 / T of a unit row: cancellation would swamp it
    err = (grad - want_grad).abs().max().item()
    assert err <= 1e-3 * scale, f"{backend}: gradient error {err:.3g} vs its size {scale:.3g}"
    # the loss (~1e-7): to float32 resolution of a loss of order 1 on every backend, and relative to
    # itself for the C++ kernel (log1p of the negatives' sum)
    err = abs(loss.item() - want_loss.item())
    assert err <= 2.0 ** -23, (loss.item(), want_loss.item())
    if backend == "cpu":
        assert err <= 1e-3 * want_loss.item(), (loss.item(), want_loss.item())
