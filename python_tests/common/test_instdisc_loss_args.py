"""InstDiscLoss raises a ValueError naming every argument the chosen loss would not use,
instead of dropping it; the combinations that do apply still build and run."""
import pytest
import torch

from instdisc_kernels import InstDiscLoss
from instdisc_kernels import reference as R

N, D = 12, 8


@pytest.mark.parametrize("kw, names", [
    # the exact softmax (num_negatives=0 or loss_type="softmax") has no Z and draws no negatives
    (dict(num_negatives=0, z="ema"), ["z='ema'"]),
    (dict(num_negatives=0, z=5.0), ["z=5.0"]),
    (dict(num_negatives=0, z_ema=0.9), ["z_ema=0.9"]),
    (dict(num_negatives=0, z_every=3), ["z_every=3"]),
    (dict(num_negatives=0, negatives="shared"), ["negatives='shared'"]),
    (dict(loss_type="softmax", negatives="per-sample"), ["negatives='per-sample'"]),
    (dict(num_negatives=0, z="exact", z_every=2, z_ema=0.5), ["z='exact'", "z_ema=0.5", "z_every=2"]),
    (dict(num_negatives=0, loss_type="nce"), ["loss_type='nce'", "num_negatives"]),
    (dict(num_negatives=0, loss_type="infonce"), ["loss_type='infonce'", "num_negatives"]),
    (dict(loss_type="softmax", num_negatives=5), ["num_negatives=5", "loss_type='softmax'"]),
    # InfoNCE does not use Z
    (dict(num_negatives=3, loss_type="infonce", z="batch"), ["z='batch'"]),
    (dict(num_negatives=3, loss_type="infonce", z_ema=0.9), ["z_ema=0.9"]),
    (dict(num_negatives=3, loss_type="infonce", z_every=2), ["z_every=2"]),
    # NCE: z_ema belongs to the "ema" policies, z_every to "exact"
    (dict(num_negatives=3, z_ema=0.9), ["z_ema=0.9", "z='batch'"]),
    (dict(num_negatives=3, z="first-batch", z_ema=0.9), ["z_ema=0.9", "z='first-batch'"]),
    (dict(num_negatives=3, z=7.0, z_ema=0.9), ["z_ema=0.9", "z=7.0"]),
    (dict(num_negatives=3, z="ema", z_every=2), ["z_every=2", "z='ema'"]),
    (dict(num_negatives=3, z_every=2), ["z_every=2"]),
    # bad values
    (dict(loss_type="sotfmax"), ["loss_type", "'softmax'"]),
    (dict(num_negatives=-1), ["num_negatives"]),
    (dict(num_negatives=True), ["num_negatives"]),
])
def test_arguments_that_do_not_apply_raise_naming_them(kw, names):
    with pytest.raises(ValueError) as e:
        InstDiscLoss(N, D, **kw)
    for name in names:
        assert name in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("kw, loss_type, k", [
    (dict(num_negatives=0), "softmax", 0),
    (dict(loss_type="softmax"), "softmax", 0),
    (dict(loss_type="softmax", num_negatives=0, proximal=0.5, momentum=0.2), "softmax", 0),
    (dict(), "nce", 4096),
    (dict(num_negatives=3, loss_type="nce", z="ema", z_ema=0.9), "nce", 3),
    (dict(num_negatives=3, z="ema-bc", z_ema=0.5), "nce", 3),
    (dict(num_negatives=3, z="exact", z_every=2), "nce", 3),
    (dict(num_negatives=3, z=7.0, negatives="shared"), "nce", 3),
    (dict(num_negatives=3, loss_type="infonce", proximal=1.0, negatives="shared"), "infonce", 3),
])
def test_arguments_that_apply_are_accepted(kw, loss_type, k):
    crit = InstDiscLoss(N, D, temperature=0.1, generator=torch.Generator().manual_seed(0), **kw)
    assert crit.loss_type == loss_type and crit.num_negatives == k
    f = torch.nn.functional.normalize(torch.randn(3, D), dim=1).requires_grad_()
    loss = crit(f, torch.tensor([0, 5, 5]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


def test_softmax_via_loss_type_is_the_exact_softmax():
    f = torch.nn.functional.normalize(torch.randn(4, D), dim=1)
    y = torch.tensor([0, 1, 2, 2])
    crit = InstDiscLoss(N, D, loss_type="softmax", temperature=0.1)
    V0 = crit.memory.clone()
    loss = crit(f, y)
    assert loss.item() == pytest.approx(R.softmax_loss_value(f, V0, y, 0.1).item(), rel=1e-5)
    assert "exact softmax" in repr(crit) and "z=" not in repr(crit)
