"""C++ CPU kernels of the fused NCE op (csrc/cpu/nce.cpp) against the float64 oracle.

Ops under test: torch.ops.instdisc.nce_forward, nce_probs, nce_probs_backward (CPU), called
directly and through the public ``nce_loss(..., backend="cpu")``.

Tolerances: for every comparison the error of the kernel against the float64 oracle
(instdisc_kernels/reference.py) must be at most twice the error that PyTorch's own eager math
makes in the same dtype (the "eager" op, nce_forward_eager, run on the same inputs), or a
small floor relative to the result's magnitude. Low-precision banks and features are compared
against the oracle evaluated on the very same (bf16/fp16-valued) tensors, so what remains is only
accumulation error.

In-kernel negatives (Philox, no explicit neg_indices) are checked without a debug path, through
the gradient. With zero features every score is 0, so with a fixed Z every negative gets the same
gradient coefficient c_neg and the positive gets c_pos:
    grad[b] = c_pos * V[y[b]] + c_neg * sum_k V[neg[b, k]].
With the identity matrix as the bank (N = D), grad[b] is therefore the histogram of row b's draws
(plus the positive's term), which we recover exactly (fp64) and test: K draws per row, a
chi-square test of uniformity, zero draws of the positive with exclude_positive. For a large,
non-power-of-two N, a bank whose row i is (i / N, i mod 2) gives the mean of the drawn indices.
"""
import math

import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import _backend
from instdisc_kernels import reference as ref

OP = torch.ops.instdisc.nce_forward
EAGER = torch.ops.instdisc.nce_forward_eager
EPS32 = 2.0 ** -24
FLOOR = {torch.float32: 16 * EPS32, torch.float64: 1e-12}   # relative error floor per accumulation dtype


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _call(op, F, mem, y, neg, *, z=0.0, T=0.07, K=None, proximal=0.0, loss_type=0, z_ema=0.0, seed=0,
          exclude=False, noise=None):
    K = neg.shape[1] if neg is not None else K
    return op(F, mem, y, neg, torch.tensor([float(z)]), torch.tensor([seed]), K, T, proximal, loss_type,
              z_ema, exclude, noise)


def _oracle(F, mem, y, neg, *, z=0.0, T=0.07, proximal=0.0, loss_type=0, z_ema=0.0):
    """(loss, grad, Z) in float64 from reference.py."""
    return ref.nce_forward(F, mem, y, neg, temperature=T, z=z, loss_type=loss_type, proximal=proximal, z_ema=z_ema)


def _assert_vs_oracle(ours, eager, exact, what, scale=None):
    """|ours - exact| <= max(2 |eager - exact|, floor * max scale), elementwise maxima. scale: the
    magnitude of what was summed (reference.nce_grad_scale for a gradient), default |exact|: where
    terms cancel, |exact| is far below them and the eager error is luck."""
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item()
    base = (eager.double() - exact).abs().max().item()
    scale = exact.abs() if scale is None else scale
    bound = max(2 * base, FLOOR[ours.dtype] * max(scale.max().item(), 1e-30))
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager error {base:.3g})"


def _problem(B, K, D, N, *, seed=0, bank_dtype=torch.float32, feat_dtype=torch.float32):
    """Unit features, lemniscate-initialised bank, a repeated positive and a negative equal to its positive."""
    g = torch.Generator().manual_seed(seed)
    mem = ref.init_memory(N, D, generator=g).to(bank_dtype)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).to(feat_dtype)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    if B > 1:
        y[1] = y[0]                      # repeated positive
    neg[:, K // 2] = y                   # a negative equal to the positive
    return F, mem, y, neg


def _z_fixed(F, mem, y, neg, T):
    """A realistic fixed Z: the batch estimate, rounded, times 1.3."""
    Z = ref.estimate_z(ref.nce_scores(F, mem, ref.index_matrix(y, neg)), T, mem.shape[0])
    return float(torch.tensor(float(Z) * 1.3, dtype=torch.float32))


MODES = {
    "nce_fixed_z": dict(loss_type=0, z="fixed"),
    "nce_estimate_z": dict(loss_type=0, z=0.0),
    "nce_ema_z": dict(loss_type=0, z="fixed", z_ema=0.99),
    "nce_proximal": dict(loss_type=0, z="fixed", proximal=0.3),
    "infonce": dict(loss_type=1, z=0.0),
    "infonce_proximal": dict(loss_type=1, z=1.0, proximal=0.5),
}
SHAPES = [  # B, K, D, N
    (1, 1, 3, 5),
    (3, 7, 100, 40),
    (64, 256, 128, 1000),
    (3, 256, 129, 300),
    (64, 7, 129, 50),
    (1, 256, 100, 20),
    (5, 23, 3, 40),          # D < 8: full blocks of 8 rows narrower than one AVX2 vector
]


def _check_forward(F, mem, y, neg, mode, T=0.07):
    kw = dict(MODES[mode])
    if kw["z"] == "fixed":
        kw["z"] = _z_fixed(F, mem, y, neg, T)
    loss, grad, z_out = _call(OP, F, mem, y, neg, T=T, **kw)
    e_loss, e_grad, e_z = _call(EAGER, F, mem, y, neg, T=T, **kw)
    x_loss, x_grad, x_z = _oracle(F, mem, y, neg, T=T, **kw)
    acc = _acc(F.dtype)
    assert loss.shape == () and loss.dtype == acc
    assert grad.shape == F.shape and grad.dtype == acc
    assert z_out.shape == (1,) and z_out.dtype == torch.float32
    _assert_vs_oracle(loss, e_loss, x_loss, f"{mode} loss")
    scale = ref.nce_grad_scale(F, mem, y, neg, temperature=T, **kw)
    _assert_vs_oracle(grad, e_grad, x_grad, f"{mode} grad", scale)
    if kw["loss_type"] == 0:
        torch.testing.assert_close(z_out.double(), x_z.reshape(1), rtol=2e-6, atol=0)
    else:
        assert torch.equal(z_out, torch.tensor([float(kw["z"])]))   # InfoNCE leaves z unchanged
    return loss, grad


def test_cpu_kernels_are_registered():
    for name in ("nce_forward", "nce_probs", "nce_probs_backward"):
        assert _backend.has_kernel(name, "CPU"), f"instdisc::{name} has no CPU kernel (extension not built?)"
    assert ik.ops.nce.TABLE.select("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("B,K,D,N", SHAPES)
def test_forward_matches_oracle(B, K, D, N, mode):
    F, mem, y, neg = _problem(B, K, D, N, seed=B * 7 + K + D)
    _check_forward(F, mem, y, neg, mode)


@pytest.mark.parametrize("bank_dtype,feat_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.float64, torch.float32),
    (torch.float64, torch.float64), (torch.float32, torch.float64), (torch.bfloat16, torch.float64),
    (torch.float16, torch.float64),
])
@pytest.mark.parametrize("mode", ["nce_estimate_z", "infonce_proximal"])
@pytest.mark.parametrize("D", [129, 5])      # bf16/fp16 rows widened in registers: a tail, and D < 8
def test_forward_dtypes(bank_dtype, feat_dtype, mode, D):
    F, mem, y, neg = _problem(5, 33, D, 60, seed=3, bank_dtype=bank_dtype, feat_dtype=feat_dtype)
    _check_forward(F, mem, y, neg, mode)


def test_forward_with_large_scores_is_finite():
    """Unnormalised features, |s| / T up to ~150: exp(s/T) and Z overflow float32, but the kernel
    works with log P and max-subtracted logits, so loss and gradient stay finite and accurate."""
    F, mem, y, neg = _problem(4, 50, 16, 30, seed=5)
    F = F * 8.0
    T = 0.05
    for loss_type in (0, 1):
        loss, grad, z_out = _call(OP, F, mem, y, neg, z=0.0, T=T, loss_type=loss_type)
        x_loss, x_grad, x_z = _oracle(F, mem, y, neg, z=0.0, T=T, loss_type=loss_type)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), x_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.double(), x_grad, rtol=1e-4, atol=1e-5 * x_grad.abs().max().item())
        if loss_type == 0:
            assert x_z > torch.finfo(torch.float32).max and z_out.item() == float("inf")


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z", [1e-37, 1e37])
def test_forward_with_extreme_fixed_z(z, feat_dtype):
    """|log P| around 70..100: the NCE terms switch to their asymptotic forms past |log P| = 80."""
    F, mem, y, neg = _problem(6, 40, 100, 50, seed=7, feat_dtype=feat_dtype)
    F = F * 3                                                   # spread the scores: |s| / T up to ~15
    T = 0.07
    z = float(torch.tensor(z, dtype=torch.float32))             # the op's z is a float32 tensor
    loss, grad, z_out = _call(OP, F, mem, y, neg, z=z, T=T)
    x_loss, x_grad, _ = _oracle(F, mem, y, neg, z=z, T=T)
    lp = ref.nce_scores(F, mem, ref.index_matrix(y, neg)) / T - torch.log(torch.tensor(z, dtype=torch.float64))
    assert (lp.abs() > 80).any() and (lp.abs() < 80).any()     # both regimes are exercised
    rtol = 1e-5 if feat_dtype == torch.float32 else 1e-11
    torch.testing.assert_close(loss.double(), x_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), x_grad, rtol=10 * rtol, atol=rtol * x_grad.abs().max().item())
    assert torch.equal(z_out, torch.tensor([z], dtype=torch.float32))


def test_forward_with_every_log_p_near_its_limit():
    """Every entry at log P = 75 (inside the limit: the vectorised path): each negative's loss
    factor 1 + P N / K is ~2^115, so a row's product of 256 of them exceeds the double range many
    times over and must be kept as mantissa and exponent."""
    D, N, K = 16, 4096, 256
    u = torch.nn.functional.normalize(torch.ones(D), dim=0)
    mem = u.repeat(N, 1)
    F = u.repeat(3, 1)
    y = torch.tensor([0, 1, 2])
    neg = torch.randint(0, N, (3, K), generator=torch.Generator().manual_seed(0))
    T = 1.0 / 80                                                # s / T = 80
    z = float(torch.tensor(math.exp(5.0), dtype=torch.float32))
    loss, grad, _ = _call(OP, F, mem, y, neg, z=z, T=T)
    x_loss, x_grad, _ = _oracle(F, mem, y, neg, z=z, T=T)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), x_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), x_grad, rtol=1e-4, atol=1e-5 * x_grad.abs().max().item())


def test_strided_and_transposed_bank():
    F, mem, y, neg = _problem(6, 20, 100, 30, seed=11)
    wide = torch.zeros(30, 117)
    wide[:, 5:105] = mem
    strided = wide[:, 5:105]                       # row stride 117
    transposed = mem.t().contiguous().t()          # column stride 30: copied by the kernel
    expected = _call(OP, F, mem, y, neg, z=0.0)
    for bank in (strided, transposed):
        got = _call(OP, F, bank, y, neg, z=0.0)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_noise_probs_matches_float64_formula():
    F, mem, y, neg = _problem(5, 40, 100, 50, seed=13)
    T, K, N = 0.07, neg.shape[1], mem.shape[0]
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(N, generator=g) + 0.1
    noise = noise / noise.sum()
    z = _z_fixed(F, mem, y, neg, T)
    loss, grad, _ = _call(OP, F, mem, y, neg, z=z, T=T, noise=noise)
    # float64 oracle: lemniscate's criterion with Pn = noise[idx], F's gradient by autograd
    idx = ref.index_matrix(y, neg)
    F64 = F.double().requires_grad_()
    P = torch.exp(torch.einsum("bkd,bd->bk", mem.double()[idx], F64) / T) / z
    kpn = K * noise.double()[idx]
    x_loss = -(torch.log(P[:, 0] / (P[:, 0] + kpn[:, 0] + ref.EPS)).sum()
               + torch.log(kpn[:, 1:] / (P[:, 1:] + kpn[:, 1:] + ref.EPS)).sum()) / F.shape[0]
    (x_grad,) = torch.autograd.grad(x_loss, F64)
    e_loss, e_grad, _ = _call(EAGER, F, mem, y, neg, z=z, T=T, noise=noise)
    _assert_vs_oracle(loss, e_loss, x_loss.detach(), "noise loss")
    _assert_vs_oracle(grad, e_grad, x_grad, "noise grad")
    # uniform noise_probs gives the default (1/N) result
    uni = _call(OP, F, mem, y, neg, z=z, T=T, noise=torch.full((N,), 1.0 / N))
    plain = _call(OP, F, mem, y, neg, z=z, T=T)
    torch.testing.assert_close(uni[0], plain[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(uni[1], plain[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
def test_public_nce_loss_backward_and_bank_update(bank_dtype, loss_type):
    B, K, D, N, T = 9, 31, 128, 40, 0.07
    F, mem, y, neg = _problem(B, K, D, N, seed=17, bank_dtype=bank_dtype)
    y[4] = y[0]                                    # a positive repeated three times
    old = mem.clone()
    z_state = torch.tensor([-1.0])                 # estimate on this first step, store it
    Fr = F.clone().requires_grad_()
    loss = ik.nce_loss(Fr, mem, y, neg_indices=neg, temperature=T, z=z_state, backend="cpu",
                       loss_type=loss_type, proximal=0.1)
    loss.backward()
    x_loss, x_grad, x_z = _oracle(F, old, y, neg, T=T, z=0.0, proximal=0.1, loss_type=int(loss_type == "infonce"))
    torch.testing.assert_close(loss.double(), x_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(Fr.grad.double(), x_grad, rtol=1e-4, atol=2e-6 * x_grad.abs().max().item())
    if loss_type == "nce":
        torch.testing.assert_close(z_state.double(), x_z.reshape(1), rtol=2e-6, atol=0)
    expected = old.clone()
    ref.memory_update_(expected, y, F, 0.5)
    tol = 2e-6 if bank_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(mem.double(), expected.double(), rtol=tol, atol=tol)
    if loss_type == "nce":   # a second step with a moving-average Z, on the updated bank
        z_prev, bank = float(z_state), mem.clone()
        F2 = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1).float()
        loss2 = ik.nce_loss(F2, mem, y, neg_indices=neg, temperature=T, z=z_state, z_ema=0.99, backend="cpu")
        x_z2 = ref.ema_z(z_prev, ref.nce_scores(F2, bank, ref.index_matrix(y, neg)), T, N, 0.99)
        torch.testing.assert_close(z_state.double(), x_z2.reshape(1), rtol=2e-6, atol=0)
        x_loss2 = ref.nce_loss_value(F2, bank, ref.index_matrix(y, neg), T, x_z2)
        torch.testing.assert_close(loss2.double(), x_loss2, rtol=2e-6, atol=0)


@pytest.mark.parametrize("loss_type,proximal", [("nce", 0.0), ("nce", 0.3), ("infonce", 0.2)])
def test_gradcheck_float64(loss_type, proximal):
    F, mem, y, neg = _problem(3, 4, 5, 10, seed=19, bank_dtype=torch.float64, feat_dtype=torch.float64)
    z = _z_fixed(F, mem, y, neg, 0.5)
    Fr = F.clone().requires_grad_()

    def f(x):
        return ik.nce_loss(x, mem, y, neg_indices=neg, temperature=0.5, z=z, update_memory=False, backend="cpu",
                           loss_type=loss_type, proximal=proximal)

    assert torch.autograd.gradcheck(f, (Fr,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("with_neg", [True, False])
def test_opcheck(with_neg):
    F, mem, y, neg = _problem(3, 5, 8, 12, seed=23)
    args = (F.requires_grad_(), mem, y, neg if with_neg else None, torch.tensor([0.0]), torch.tensor([7]), 5,
            0.1, 0.2, 0, 0.0, not with_neg, None)
    torch.library.opcheck(OP.default, args)


# --------------------------------------------------------------------------- #
# Determinism and in-kernel sampling                                           #
# --------------------------------------------------------------------------- #
def test_bit_reproducible_across_thread_counts():
    F, mem, y, neg = _problem(37, 300, 128, 500, seed=29)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([*_call(OP, F, mem, y, neg, z=0.0), *_call(OP, F, mem, y, None, K=300, seed=5, z=0.0)])
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_seed_determines_draws():
    F, mem, y, _ = _problem(8, 64, 32, 100, seed=31)
    a = _call(OP, F, mem, y, None, K=64, seed=123, z=0.0)
    b = _call(OP, F, mem, y, None, K=64, seed=123, z=0.0)
    c = _call(OP, F, mem, y, None, K=64, seed=124, z=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # through the public function: the seed comes from the generator
    losses = [ik.nce_loss(F, mem.clone(), y, num_negatives=64, backend="cpu",
                          generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


def _draw_counts(N, B, K, seed, exclude):
    """Histogram (B x N) of each row's in-kernel draws, recovered exactly from the gradient."""
    mem = torch.eye(N, dtype=torch.float64)
    F = torch.zeros(B, N, dtype=torch.float64)
    y = torch.arange(B) * 7 % N
    T = 0.5
    _, grad, _ = _call(OP, F, mem, y, None, K=K, seed=seed, z=1.0, T=T, exclude=exclude)
    c = K / N + ref.EPS                           # P = exp(0) / 1 = 1 everywhere
    c_pos, c_neg = -c / (1 + c) / (T * B), 1 / (1 + c) / (T * B)
    counts = grad.clone()
    counts[torch.arange(B), y] -= c_pos
    counts = counts / c_neg
    assert (counts - counts.round()).abs().max() < 1e-6
    return counts.round().long(), y


@pytest.mark.parametrize("exclude", [False, True])
def test_in_kernel_draws_are_uniform(exclude):
    from scipy.stats import chi2
    N, B, K = 101, 64, 1500
    counts, y = _draw_counts(N, B, K, seed=2024, exclude=exclude)
    assert (counts.sum(1) == K).all()
    assert (counts >= 0).all()
    if exclude:
        assert (counts[torch.arange(B), y] == 0).all(), "exclude_positive drew a positive"
    # chi-square on all draws: expected count per bin per row, the positive's bin removed when excluded
    mask = torch.ones(B, N, dtype=torch.bool)
    if exclude:
        mask[torch.arange(B), y] = False
    expected = K / mask.sum(1, keepdim=True).double()
    stat = (((counts.double() - expected) ** 2 / expected)[mask]).sum().item()
    dof = int(mask.sum()) - B
    assert stat < chi2.ppf(1 - 1e-6, dof), f"chi-square {stat:.1f} with {dof} dof"
    assert stat > chi2.ppf(1e-6, dof), f"chi-square {stat:.1f} with {dof} dof: suspiciously regular"
    # rows are drawn independently: no two rows share a histogram
    assert len({tuple(r.tolist()) for r in counts}) == B
    # the positive is drawn at the uniform rate without exclude_positive
    if not exclude:
        pos_rate = counts[torch.arange(B), y].double().mean().item() / K
        assert abs(pos_rate - 1 / N) < 5 * (1 / N / K / B) ** 0.5 + 1e-12


def test_in_kernel_draws_cover_a_large_range():
    N, B, K, T = 1_000_003, 16, 4096, 0.5
    i = torch.arange(N, dtype=torch.float64)
    mem = torch.stack([i / N, i % 2], dim=1).to(torch.float64)
    F = torch.zeros(B, 2, dtype=torch.float64)
    y = torch.arange(B)
    _, grad, _ = _call(OP, F, mem, y, None, K=K, seed=99, z=1.0, T=T)
    c = K / N + ref.EPS
    c_pos, c_neg = -c / (1 + c) / (T * B), 1 / (1 + c) / (T * B)
    sums = (grad - c_pos * mem[y]) / c_neg           # sum over each row's draws of (i/N, i mod 2)
    mean = sums.sum(0) / (B * K)
    se = (1 / 12 / (B * K)) ** 0.5
    assert abs(mean[0].item() - 0.5) < 5 * se       # 0.5 - 1/(2N) is within noise
    assert abs(mean[1].item() - 0.5) < 5 * 0.5 / (B * K) ** 0.5


# --------------------------------------------------------------------------- #
# nce_probs / nce_probs_backward                                               #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("B,K1,D,N", [(1, 2, 3, 4), (5, 34, 100, 50), (16, 257, 129, 300)])
@pytest.mark.parametrize("z", [0.0, -1.0, 3.5])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_probs_and_backward_match_oracle(B, K1, D, N, z, bank_dtype):
    T = 0.07
    F, mem, y, neg = _problem(B, K1 - 1, D, N, seed=B + K1, bank_dtype=bank_dtype)
    idx = ref.index_matrix(y, neg)
    probs, z_out = torch.ops.instdisc.nce_probs(F, mem, idx, torch.tensor([z]), T)
    Z = ref.estimate_z(ref.nce_scores(F, mem, idx), T, N) if z <= 0 else torch.tensor(z, dtype=torch.float64)
    x_probs = ref.nce_probs(F, mem, idx, T, Z)
    e_probs, _ = ik.ops.nce_probs.probs_eager(F, mem, idx, torch.tensor([z]), T)
    assert probs.dtype == torch.float32 and probs.shape == (B, K1)
    _assert_vs_oracle(probs, e_probs, x_probs, "probs")
    torch.testing.assert_close(z_out.double(), Z.reshape(1), rtol=2e-6, atol=0)

    g = torch.Generator().manual_seed(3)
    grads = {
        "contiguous": torch.randn(B, K1, generator=g),
        "transposed": torch.randn(K1, B, generator=g).t(),
        "stride0": torch.full((1, 1), -1.0 / B).expand(B, K1),   # NCECriterion-like constant gradient
    }
    for name, gp in grads.items():
        gf = torch.ops.instdisc.nce_probs_backward(gp, probs, mem, idx, T)
        assert gf.shape == (B, D) and gf.dtype == torch.float32
        x_gf = torch.einsum("bk,bkd->bd", gp.double() * probs.double() / T, mem.double()[idx])
        e_gf = ik.ops.nce_probs.probs_backward_eager(gp, probs, mem, idx, T)
        _assert_vs_oracle(gf, e_gf, x_gf, f"probs backward ({name})")


def test_probs_float64_features():
    F, mem, y, neg = _problem(4, 9, 17, 20, seed=41, bank_dtype=torch.float64, feat_dtype=torch.float64)
    idx = ref.index_matrix(y, neg)
    probs, _ = torch.ops.instdisc.nce_probs(F, mem, idx, torch.tensor([2.0]), 0.1)
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs, ref.nce_probs(F, mem, idx, 0.1, 2.0), rtol=1e-12, atol=0)
    gp = torch.randn(4, 10, dtype=torch.float64)
    gf = torch.ops.instdisc.nce_probs_backward(gp, probs, mem, idx, 0.1)
    torch.testing.assert_close(gf, torch.einsum("bk,bkd->bd", gp * probs / 0.1, mem[idx]), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- #
# Bad input: a clear error naming the argument, the bank untouched             #
# --------------------------------------------------------------------------- #
def _bad_forward_cases():
    F, mem, y, neg = _problem(3, 4, 6, 10, seed=43)
    ok = dict(F=F, mem=mem, y=y, neg=neg, z=torch.tensor([1.0]), seed=torch.tensor([1]), K=4, T=0.1, prox=0.0,
              lt=0, ema=0.0, excl=False, noise=None)
    cases = [
        (dict(F=F[:, :5]), ValueError, "features"),
        (dict(F=F.int()), TypeError, "features"),
        (dict(mem=mem.long()), TypeError, "memory"),
        (dict(y=torch.tensor([0, 1, 10])), ValueError, "indices"),
        (dict(y=torch.tensor([0, -1, 2])), ValueError, "indices"),
        (dict(y=y.int()), TypeError, "indices"),
        (dict(y=y[:2]), ValueError, "indices"),
        (dict(neg=torch.full((3, 4), 10)), ValueError, "neg_indices"),
        (dict(neg=neg[:, :3]), ValueError, "neg_indices"),
        (dict(neg=neg.int()), TypeError, "neg_indices"),
        (dict(z=torch.tensor([1.0, 2.0])), ValueError, "z"),
        (dict(seed=torch.tensor([1.0])), TypeError, "seed"),
        (dict(T=0.0), ValueError, "temperature"),
        (dict(T=float("nan")), ValueError, "temperature"),
        (dict(prox=-1.0), ValueError, "proximal"),
        (dict(lt=2), ValueError, "loss_type"),
        (dict(ema=1.0), ValueError, "z_ema"),
        (dict(neg=None, K=0), ValueError, "num_negatives"),
        (dict(neg=None, noise=torch.full((10,), 0.1)), ValueError, "noise_probs"),
        (dict(noise=torch.full((9,), 0.1)), ValueError, "noise_probs"),
        (dict(mem=mem[:1], y=torch.zeros(3, dtype=torch.long), neg=None, excl=True), ValueError, "exclude_positive"),
    ]
    return ok, cases


@pytest.mark.parametrize("case", range(len(_bad_forward_cases()[1])))
def test_forward_rejects_bad_input(case):
    ok, cases = _bad_forward_cases()
    change, exc, name = cases[case]
    a = {**ok, **change}
    before = a["mem"].clone()
    with pytest.raises(exc, match=name):
        OP(a["F"], a["mem"], a["y"], a["neg"], a["z"], a["seed"], a["K"], a["T"], a["prox"], a["lt"], a["ema"],
           a["excl"], a["noise"])
    assert torch.equal(a["mem"], before)


def test_public_nce_loss_out_of_range_without_validation_leaves_bank_unchanged():
    F, mem, y, neg = _problem(3, 4, 6, 10, seed=47)
    neg[1, 2] = 10
    before = mem.clone()
    with pytest.raises(ValueError, match="neg_indices"):
        ik.nce_loss(F, mem, y, neg_indices=neg, backend="cpu", validate=False)
    assert torch.equal(mem, before)


def test_probs_ops_reject_bad_input():
    F, mem, y, neg = _problem(3, 4, 6, 10, seed=53)
    idx = ref.index_matrix(y, neg)
    before = mem.clone()
    with pytest.raises(ValueError, match="idx"):
        torch.ops.instdisc.nce_probs(F, mem, idx + 10, torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="idx"):
        torch.ops.instdisc.nce_probs(F, mem, idx[:2], torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="features"):
        torch.ops.instdisc.nce_probs(F[:, :4], mem, idx, torch.tensor([1.0]), 0.1)
    probs, _ = torch.ops.instdisc.nce_probs(F, mem, idx, torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="grad_probs"):
        torch.ops.instdisc.nce_probs_backward(probs[:, :3], probs, mem, idx, 0.1)
    with pytest.raises(TypeError, match="probs"):
        torch.ops.instdisc.nce_probs_backward(probs, probs.half(), mem, idx, 0.1)
    with pytest.raises(ValueError, match="idx"):
        torch.ops.instdisc.nce_probs_backward(probs, probs, mem, idx - 1, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.instdisc.nce_probs_backward(probs, probs, mem, idx, -0.1)
    assert torch.equal(mem, before)
