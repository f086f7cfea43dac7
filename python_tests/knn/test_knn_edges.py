"""kNN at the numeric edges: a tiny temperature never gives inf scores (knn_predict
rejects it clearly, knn_accuracy weighs relative to the best neighbour), and a huge
label with num_classes=None is a ValueError naming the labels."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels.ops import knn as knn_mod

BACKENDS = ["eager", "auto"] + (["cpu"] if knn_mod.TABLE.available("cpu", torch.device("cpu")) else [])


def _data(Q=7, N=40, D=16, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)  # noqa: E731
    return unit(Q), unit(N), torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (Q,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1e-8, 1e-4])
def test_tiny_temperature_predict_raises_clearly_never_inf(backend, T):
    q, bank, bl, _ = _data()
    with pytest.raises(ValueError, match="temperature"):
        ik.knn_predict(q, bank, bl, k=10, temperature=T, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_accuracy_is_the_nearest_neighbour_vote(backend):
    q, bank, bl, ql = _data()
    top1, top5 = ik.knn_accuracy(q, ql, bank, bl, k=10, temperature=1e-8, backend=backend)
    nearest = bl[(q.double() @ bank.double().t()).argmax(1)]
    assert top1 == pytest.approx(100.0 * float((nearest == ql).double().mean()))
    assert top1 <= top5 <= 100.0
    # a moderate temperature gives knn_predict's ranking
    sc = ik.knn_predict(q, bank, bl, k=10, temperature=0.1, backend=backend, num_classes=5)
    want1 = 100.0 * float((torch.sort(sc, dim=1, descending=True, stable=True).indices[:, 0] == ql).double().mean())
    assert ik.knn_accuracy(q, ql, bank, bl, k=10, temperature=0.1, backend=backend, num_classes=5)[0] == pytest.approx(want1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_label_without_num_classes_names_the_labels(backend):
    q, bank, bl, ql = _data()
    bl = bl.clone()
    bl[3] = 10 ** 13
    with pytest.raises(ValueError, match="bank_labels"):
        ik.knn_predict(q, bank, bl, k=5, backend=backend)
    with pytest.raises(ValueError, match="bank_labels"):
        ik.knn_accuracy(q, ql, bank, bl, k=5, backend=backend)
    ql = ql.clone()
    ql[0] = 10 ** 13
    with pytest.raises(ValueError, match="query_labels"):
        ik.knn_accuracy(q, ql, bank, bl.clamp(max=4), k=5, backend=backend)
