"""Test helper: query and bank data for the kNN tests (unit rows, clustered classes, exact ties)
and the stable float64 top-k they are checked against."""
import torch


def _unit(*shape, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


def _clustered(Q, N, D, C, dtype=torch.float32, spread=1.0):
    cent = _unit(C, D, dtype=torch.float64)
    lab = torch.randint(0, C, (N,))
    qlab = torch.randint(0, C, (Q,))
    bank = torch.nn.functional.normalize(cent[lab] + spread * _unit(N, D, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(cent[qlab] + spread * _unit(Q, D, dtype=torch.float64), dim=1)
    return q.to(dtype), qlab, bank.to(dtype), lab


def _stable_topk(q, bank, k):
    sim = q.double() @ bank.double().t()
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return sim.gather(1, order), order


def _tied_data():
    # entries in {-2..2}/4: every dot product is exact in fp32, so equal rows tie exactly
    base = torch.randint(-2, 3, (40, 4)).float() / 4
    bank = torch.cat([base, base.flip(0), base])            # each row three times, spread out
    q = torch.randint(-2, 3, (6, 4)).float() / 4
    q[0] = 0                                                # all N similarities tie
    return q, bank
