"""The NCE normaliser policies (ops/z_policy.py) against the float64 oracle: the exact
partition function, each policy's Z sequence through the op on every backend, and
InstDiscLoss's Z state (default policy, rejected calls, checkpoints)."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.lemniscate import NCEAverage
from instdisc_kernels.modules import InstDiscLoss
from instdisc_kernels.ops import nce as nce_mod
from instdisc_kernels.ops import z_policy
from instdisc_kernels.ops.nce import draw_negatives

CPU = torch.device("cpu")
BACKENDS = [b for b in ("eager", "cpu", "triton") if nce_mod.TABLE.available(b, CPU)]


def _unit(B, D, g):
    return torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)


@pytest.mark.parametrize("B, N, chunk", [(1, 1, None), (1, 50, 7), (7, 50, 1), (5, 37, None), (3, 37, 37)])
@pytest.mark.parametrize("bank_dtype, rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float64, 1e-12)])
def test_exact_z_matches_oracle(B, N, chunk, bank_dtype, rtol):
    g = torch.Generator().manual_seed(B * 100 + N)
    D, T = 100, 0.07
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(bank_dtype)
    f = _unit(B, D, g)
    f[-1] = mem[0].float()                                   # a feature equal to a bank row: the largest logit
    if bank_dtype == torch.float64:
        f = f.double()
    lse = z_policy.log_partition(f, mem, T, chunk)
    assert lse.shape == (B,) and lse.dtype == (torch.float64 if f.dtype == torch.float64 else torch.float32)
    want_lse = torch.logsumexp(ref.softmax_logits(f, mem, T), dim=1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=rtol, atol=0)
    assert z_policy.exact_z(f, mem, T, chunk) == pytest.approx(ref.exact_z(f, mem, T).item(), rel=rtol)


def test_exact_z_stays_finite_for_huge_logits():
    g = torch.Generator().manual_seed(1)
    mem = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1)
    z = z_policy.exact_z(mem[:2].clone(), mem, 1e-3)           # exp(1000): beyond float32 and float64
    assert z == float(torch.finfo(torch.float32).max)


def test_bias_corrected_factor_reproduces_adam_style_average():
    a, ests = 0.9, [3.0, 10.0, 4.0, 8.0, 8.5]
    want = ref.bias_corrected_ema_z(ests, a)
    z = None
    for t, est in enumerate(ests, 1):
        at = z_policy.bias_corrected_factor(a, t)
        z = est if t == 1 else at * z + (1 - at) * est
        assert z == pytest.approx(want[t - 1], rel=1e-12)
    assert z_policy.bias_corrected_factor(a, 1) == 0.0


def _oracle_z(policy, step, ests, prev, f, mem0, T, a, every):
    if policy == "first-batch":
        return ests[0]
    if policy == "ema":
        return ests[0] if step == 0 else a * prev + (1 - a) * ests[-1]
    if policy == "ema-bc":
        return ref.bias_corrected_ema_z(ests, a)[-1]
    if policy == "batch":
        return ests[-1]
    assert policy == "exact"
    return ref.exact_z(f, mem0, T).item() if step % every == 0 else prev


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", z_policy.Z_POLICIES)
def test_policy_sequence_through_the_op_matches_oracle(backend, policy):
    """Five steps of nce_loss with the policy's Z (odd batch sizes, B = 1, repeated positives,
    D = 100): Z, loss, gradient and the bank match the float64 oracle at every step."""
    g = torch.Generator().manual_seed(7)
    N, D, K, T, a, every = 37, 100, 9, 0.1, 0.8, 2
    mem = ref.init_memory(N, D, generator=g)
    state = torch.tensor([-1.0])
    ests, prev = [], None
    for step, B in enumerate((1, 4, 3, 5, 2)):
        f = _unit(B, D, g)
        y = torch.randint(0, N, (B,), generator=g)
        y[-1] = y[0]                                          # a repeated positive (B = 1: itself)
        neg = torch.randint(0, N, (B, K), generator=g)
        mem0, state0 = mem.clone(), state.clone()
        z_in, z_ema = z_policy.prepare(policy, state, step, f, mem, T, z_ema=a, z_every=every)
        assert torch.equal(state, state0)                     # prepare leaves the state alone
        x = f.clone().requires_grad_()
        loss = ik.nce_loss(x, mem, y, neg_indices=neg, temperature=T, z=z_in, z_ema=z_ema, backend=backend)
        loss.backward()
        state.copy_(z_in)
        idx = ref.index_matrix(y, neg)
        ests.append(ref.estimate_z(ref.nce_scores(f, mem0, idx), T, N).item())
        Z = _oracle_z(policy, step, ests, prev, f, mem0, T, a, every)
        assert state.item() == pytest.approx(Z, rel=2e-5), step
        assert loss.item() == pytest.approx(ref.nce_loss_value(f, mem0, idx, T, Z).item(), rel=2e-5), step
        torch.testing.assert_close(x.grad.double(), ref.nce_grad(f, mem0, idx, T, Z), rtol=1e-4, atol=1e-6)
        want_mem = mem0.double().clone()
        ref.memory_update_(want_mem, y, f, 0.5)
        torch.testing.assert_close(mem.double(), want_mem, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(state).all() and state.item() > 0
        prev = state.item()


def test_instdisc_loss_exact_policy_matches_oracle_and_counts_steps():
    """InstDiscLoss(z="exact", z_every=3) with the reference backend (its negatives come from
    the module's generator): Z refreshed exactly at steps 0 and 3, fixed in between."""
    N, D, K, T = 23, 100, 6, 0.1
    gen = torch.Generator().manual_seed(3)
    crit = InstDiscLoss(N, D, num_negatives=K, temperature=T, z="exact", z_every=3, backend="eager",
                        generator=gen)
    g = torch.Generator().manual_seed(4)
    Z = None
    for step in range(5):
        B = 1 + step % 3
        f, y = _unit(B, D, g), torch.randint(0, N, (B,), generator=g)
        mem0 = crit.memory.clone()
        twin = torch.Generator()
        twin.set_state(crit.generator.get_state())
        neg = draw_negatives(y, N, K, generator=twin)
        loss = crit(f, y)
        if step % 3 == 0:
            Z = ref.exact_z(f, mem0, T).item()
        assert float(crit.z) == pytest.approx(Z, rel=2e-5) and int(crit.z_step) == step + 1
        idx = ref.index_matrix(y, neg)
        assert loss.item() == pytest.approx(ref.nce_loss_value(f, mem0, idx, T, Z).item(), rel=2e-5)


def test_default_policy_is_batch_and_lemniscate_keeps_first_batch():
    crit = InstDiscLoss(30, 8, num_negatives=5, temperature=0.1)
    assert crit.z_mode == z_policy.DEFAULT_POLICY == "batch"
    g = torch.Generator().manual_seed(0)
    zs = []
    for _ in range(3):
        crit(_unit(4, 8, g), torch.randint(0, 30, (4,), generator=g))
        zs.append(float(crit.z))
    assert len(set(zs)) == 3 and all(z > 0 for z in zs)        # re-estimated every batch
    lem = NCEAverage(8, 30, 5, T=0.1)
    zl = []
    for _ in range(3):
        lem(_unit(4, 8, g), torch.randint(0, 30, (4,), generator=g))
        zl.append(float(lem.params[2]))
    assert zl[0] > 0 and zl == [zl[0]] * 3                    # lemniscate: the first batch's Z, frozen


@pytest.mark.parametrize("policy", ["batch", "exact", "ema-bc", "ema"])
def test_rejected_call_leaves_z_step_and_bank_unchanged(policy):
    crit = InstDiscLoss(20, 8, num_negatives=4, temperature=0.1, z=policy)
    g = torch.Generator().manual_seed(0)
    crit(_unit(3, 8, g), torch.tensor([1, 2, 3]))
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    bad = [
        ((_unit(3, 8, g), torch.tensor([1, 2, 20])), "indices"),
        ((_unit(3, 5, g), torch.tensor([1, 2, 3])), "features"),
        ((torch.full((3, 8), float("nan")), torch.tensor([1, 2, 3])), "features"),
    ]
    for args, needle in bad:
        with pytest.raises(ValueError, match=needle):
            crit(*args)
        for k, v in crit.state_dict().items():
            assert torch.equal(v, before[k]), (policy, needle, k)


@pytest.mark.parametrize("kw, needle", [
    (dict(z="sometimes"), "z must be one of"), (dict(z=-1.0), "z must be"), (dict(z=float("inf")), "z must be"),
    (dict(z="exact", z_every=0), "z_every"), (dict(z="ema-bc", z_ema=1.0), "z_ema"),
])
def test_bad_policy_arguments_name_the_argument(kw, needle):
    with pytest.raises(ValueError, match=needle):
        InstDiscLoss(10, 4, num_negatives=2, **kw)


def test_checkpoint_round_trip_and_checkpoints_without_z_step():
    a = InstDiscLoss(12, 4, num_negatives=3, temperature=0.1, z="ema-bc")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        a(_unit(2, 4, g), torch.tensor([0, 5]))
    b = InstDiscLoss(12, 4, num_negatives=3, temperature=0.1, z="ema-bc")
    b.load_state_dict(a.state_dict())
    assert int(b.z_step) == 2 and torch.equal(b.z, a.z)
    old = {k: v for k, v in a.state_dict().items() if k != "z_step"}      # written before z_step existed
    c = InstDiscLoss(12, 4, num_negatives=3, temperature=0.1, z="ema-bc")
    c.load_state_dict(old)
    assert int(c.z_step) == 0 and torch.equal(c.z, a.z)
