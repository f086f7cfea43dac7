"""Expected values of csrc/test/smoke_test.cpp, from the float64 oracle
instdisc_kernels/reference.py, on closed-form inputs (no RNG), in float32 as the
test builds them. Run: .venv/bin/python csrc/test/smoke_values.py"""
import math

import torch

from instdisc_kernels import reference as R

B, D, N, K, T = 3, 5, 7, 4, 0.5


def inputs():
    F = torch.tensor([[0.5 * math.sin(1 + b * D + d) for d in range(D)] for b in range(B)], dtype=torch.float32)
    V = torch.tensor([[0.5 * math.cos(1 + 2 * n + 3 * d) for d in range(D)] for n in range(N)], dtype=torch.float32)
    y = torch.tensor([2, 0, 2])
    neg = torch.tensor([[(3 * b + 2 * k + 1) % N for k in range(K)] for b in range(B)])
    return F, V, y, neg


def fmt(t):
    return ", ".join(f"{v:.9g}" for v in t.reshape(-1).tolist())


if __name__ == "__main__":
    F, V, y, neg = inputs()
    idx = R.index_matrix(y, neg)
    z = R.estimate_z(R.nce_scores(F, V, idx), T, N)
    print("nce  loss", f"{R.nce_loss_value(F, V, idx, T, z).item():.9g}", "z", f"{z.item():.9g}")
    print("nce  grad", fmt(R.nce_grad(F, V, idx, T, z)))
    print("info loss", f"{R.infonce_loss_value(F, V, idx, T).item():.9g}")
    print("info grad", fmt(R.infonce_grad(F, V, idx, T)))
    Vu = V.clone()
    R.memory_update_(Vu, y, F, 0.5)
    print("bank rows 0, 2", fmt(Vu[[0, 2]]))
    sim = F.double() @ V.double().t()                  # as reference.knn_scores ranks neighbours
    idx = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :K]
    print("knn  top-k indices", fmt(idx), "similarities", fmt(sim.gather(1, idx)))
