"""knn_search (FAISS-shaped exact inner-product search) against the float64 oracle."""
import pytest
import torch

from helpers.knn_data import _clustered, _tied_data, _unit
from instdisc_kernels import knn_search
from instdisc_kernels import reference as R
from instdisc_kernels.ops import knn as K

BACKENDS = ["eager", "auto"] + (["cpu"] if K.TABLE.available("cpu", torch.device("cpu")) else [])

SHAPES = [  # Q, N, D, k
    (1, 1, 1, 1),
    (7, 300, 100, 10),
    (5, 50, 3, 50),        # k = N
    (70, 1000, 128, 200),  # more queries than one 64-query block
]


def _check(q, bank, k, backend):
    v, i = knn_search(q, bank, k, backend=backend)
    rv, ri = R.knn_topk(q, bank, k)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == i.shape == (q.shape[0], k)
    # the C++ kernel is exact (float64 top k); the eager (chunked) path ranks in fp32
    exact = backend == "cpu" or (backend == "auto" and K._CPU_FAST)
    if exact:
        assert torch.equal(i, ri)
    else:
        assert (i == ri).float().mean() > 0.99
    assert torch.allclose(v.double(), rv, rtol=2.0 ** -22, atol=1e-6)
    assert (v[:, :-1] >= v[:, 1:]).all()            # sorted, descending


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Q,N,D,k", SHAPES)
def test_matches_oracle(backend, Q, N, D, k):
    _check(_unit(Q, D), _unit(N, D), k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bank_dtypes(backend, dtype):
    q, _, bank, _ = _clustered(9, 400, 64, 4)
    _check(q, bank.to(dtype), 17, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_index(backend):
    q, bank = _tied_data()
    v, i = knn_search(q, bank, 12, backend=backend)
    rv, ri = R.knn_topk(q, bank, 12)
    assert torch.equal(i, ri)
    assert torch.equal(i[0], torch.arange(12))      # query 0 ties with every row: indices 0..11


def test_inner_product_not_cosine():
    # unnormalised rows: the answer ranks by inner product, as faiss.IndexFlatIP does
    bank = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    v, i = knn_search(torch.tensor([[1.0, 0.5]]), bank, 3)
    assert i.tolist() == [[1, 0, 2]] and v.tolist() == [[3.0, 1.0, 1.0]]


@pytest.mark.parametrize("bad,err,match", [
    (dict(k=0), ValueError, "k"),
    (dict(k=11), ValueError, "larger than the number of bank rows"),
    (dict(queries=torch.zeros(3, 5)), ValueError, "queries"),
    (dict(queries=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "queries"),
    (dict(bank=torch.full((10, 4), float("nan"))), ValueError, "bank"),
    (dict(queries=torch.full((3, 4), float("inf"))), ValueError, "queries"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(bad, err, match):
    args = dict(queries=_unit(3, 4), bank=_unit(10, 4), k=2)
    args.update(bad)
    with pytest.raises(err, match=match):
        knn_search(args.pop("queries"), args.pop("bank"), args.pop("k"), **args)
