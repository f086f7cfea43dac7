"""Weighted kNN (docs/method.md#evaluation-weighted-k-nearest-neighbours) against the float64 oracle; evaluate_knn."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers.alloc import AllocTracker
from helpers.knn_data import _clustered, _stable_topk, _tied_data, _unit
from instdisc_kernels import knn_accuracy, knn_predict
from instdisc_kernels import reference as R
from instdisc_kernels.evaluate import evaluate_knn, extract_features
from instdisc_kernels.ops import knn as K

T = 0.07


CASES = [  # Q, N, D, k, C, chunk, query_batch
    (7, 300, 100, 10, 5, 64, 4),       # N not a multiple of the chunk
    (5, 50, 3, 50, 2, 16, 2),          # k = N, C = 2
    (9, 1000, 129, 1, 1000, 100, 5),   # k = 1, C = 1000
    (16, 2000, 128, 200, 10, 256, 8),  # the default k, group filtering active
    (3, 17, 5, 17, 3, 64, 1),          # N < chunk
    (4, 700, 16, 30, 7, 250, 4),       # chunk smaller than... a non-multiple of GROUP
    (6, 90, 8, 40, 3, 7, 6),           # chunk < k: running set fills over several chunks
]


@pytest.mark.parametrize("Q,N,D,k,C,chunk,qb", CASES)
def test_topk_and_scores_match_oracle(Q, N, D, k, C, chunk, qb):
    q, _, bank, lab = _clustered(Q, N, D, C)
    v, i = K.knn_topk(q, bank, k, chunk_size=chunk, query_batch=qb)
    rv, ri = _stable_topk(q, bank, k)
    assert torch.equal(i, ri)
    assert (v.double() - rv).abs().max().item() <= 1e-6
    sc = knn_predict(q, bank, lab, k=k, temperature=T, num_classes=C, chunk_size=chunk, query_batch=qb)
    ref = R.knn_scores(q, bank, lab, k, T, C)
    assert sc.shape == (Q, C) and sc.dtype == torch.float32
    assert ((sc.double() - ref).abs() <= 2e-5 * ref.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("qdtype,bdtype,tol", [
    (torch.float32, torch.bfloat16, 2e-5), (torch.bfloat16, torch.float32, 2e-5),
    (torch.float16, torch.float16, 2e-5), (torch.float64, torch.float64, 1e-12)])
def test_dtypes(qdtype, bdtype, tol):
    # storage dtypes are upcast exactly: against the oracle on the stored values
    # only the fp32 (fp64) arithmetic differs
    q, _, bank, lab = _clustered(6, 400, 32, 4)
    q, bank = q.to(qdtype), bank.to(bdtype)
    sc = knn_predict(q, bank, lab, k=25, temperature=0.1, num_classes=4, chunk_size=64)
    ref = R.knn_scores(q, bank, lab, 25, 0.1, 4)
    assert sc.dtype == (torch.float64 if qdtype == torch.float64 else torch.float32)
    assert ((sc.double() - ref).abs() <= tol * ref.abs().amax(1, keepdim=True)).all()
    assert torch.equal(K.knn_topk(q, bank, 25, chunk_size=64)[1], _stable_topk(q, bank, 25)[1])


def test_eager_and_cpu_backends_agree():
    q, _, bank, lab = _clustered(5, 300, 16, 6)
    a = knn_predict(q, bank, lab, k=20, num_classes=6, backend="eager")
    b = knn_predict(q, bank, lab, k=20, num_classes=6, backend="cpu", chunk_size=50)
    ref = R.knn_scores(q, bank, lab, 20, T, 6)
    assert ((a.double() - ref).abs() <= 2e-5 * ref.abs().amax(1, keepdim=True)).all()
    assert ((b.double() - ref).abs() <= 2e-5 * ref.abs().amax(1, keepdim=True)).all()


# --------------------------------------------------------------------------- #
# Ties: lower bank index first                                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("k", [1, 5, 40, 41, 100, 120])
def test_ties_lower_index_first(k):
    q, bank = _tied_data()
    _, ri = _stable_topk(q, bank, k)
    for chunk in (1, 7, 32, 33, 64, 200):
        for qb in (1, 4):
            _, i = K.knn_topk(q, bank, k, chunk_size=chunk, query_batch=qb)
            assert torch.equal(i, ri), (k, chunk, qb)


def test_ties_scores_match_oracle():
    q, bank = _tied_data()
    lab = torch.arange(bank.shape[0]) % 5
    for k in (3, 41, 120):
        sc = knn_predict(q, bank, lab, k=k, temperature=0.1, num_classes=5, chunk_size=16)
        ref = R.knn_scores(q, bank, lab, k, 0.1, 5)
        assert ((sc.double() - ref).abs() <= 2e-5 * ref.abs().amax(1, keepdim=True)).all()


def test_class_score_tie_goes_to_lower_class():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([3, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # k = 2: classes 3 and 1 get the same score; class 1 wins
    assert knn_accuracy(q, torch.tensor([1]), bank, lab, k=2) == (100.0, 100.0)
    assert knn_accuracy(q, torch.tensor([3]), bank, lab, k=2)[0] == 0.0


# --------------------------------------------------------------------------- #
# Accuracy                                                                     #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("C,k", [(2, 5), (10, 50), (1000, 200), (1, 3)])
def test_accuracy_matches_oracle(C, k):
    q, qlab, bank, lab = _clustered(60, 1500, 32, C, spread=0.6)
    top1, top5 = knn_accuracy(q, qlab, bank, lab, k=k, temperature=T, num_classes=C, batch_size=25,
                              chunk_size=256, query_batch=16)
    r1, r5 = R.knn_topk_accuracy(R.knn_scores(q, bank, lab, k, T, C), qlab)
    assert (top1, top5) == pytest.approx((r1, r5), abs=1e-9)
    if C == 1:
        assert (top1, top5) == (100.0, 100.0)


def test_accuracy_infers_num_classes_from_both_label_sets():
    q, qlab, bank, lab = _clustered(20, 200, 8, 4)
    qlab[0] = 6                                    # a class absent from the bank
    top1, top5 = knn_accuracy(q, qlab, bank, lab, k=10)
    r1, r5 = R.knn_topk_accuracy(R.knn_scores(q, bank, lab, 10, T, 7), qlab)
    assert (top1, top5) == pytest.approx((r1, r5))


# --------------------------------------------------------------------------- #
# Memory: never a Q x N tensor                                                 #
# --------------------------------------------------------------------------- #
def test_never_allocates_q_by_n():
    Q, N, D, k, chunk, qb = 64, 4096, 16, 10, 256, 32
    q, _, bank, _ = _clustered(Q, N, D, 5)
    with AllocTracker(q, bank) as tr:
        K.knn_topk(q, bank, k, chunk_size=chunk, query_batch=qb)
    qxn = Q * N * 4
    assert tr.largest < qxn / 8, (tr.largest, qxn)
    assert tr.peak < qxn / 4, (tr.peak, qxn)


# --------------------------------------------------------------------------- #
# Validation                                                                   #
# --------------------------------------------------------------------------- #
def test_validation_errors():
    q, qlab, bank, lab = _clustered(4, 30, 8, 3)
    nan = q.clone()
    nan[0, 0] = float("nan")
    cases = [
        (dict(bank_labels=lab.float()), TypeError, "bank_labels"),
        (dict(bank_labels=lab[:-1]), ValueError, "bank_labels"),
        (dict(bank_labels=lab - 1), ValueError, "bank_labels"),
        (dict(bank_labels=lab, num_classes=2), ValueError, "bank_labels"),
        (dict(k=31), ValueError, "k"),
        (dict(k=0), ValueError, "k"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(queries=q[:, :5]), ValueError, "queries"),
        (dict(queries=nan), ValueError, "queries"),
        (dict(bank=bank.long()), TypeError, "bank"),
        (dict(backend="triton"), ValueError, "backend"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(query_batch=-1), ValueError, "query_batch"),
        (dict(num_classes=0), ValueError, "num_classes"),
    ]
    for override, exc, name in cases:
        kw = dict(queries=q, bank=bank, bank_labels=lab, k=5)
        kw.update(override)
        with pytest.raises(exc, match=name):
            knn_predict(kw.pop("queries"), kw.pop("bank"), kw.pop("bank_labels"), **kw)
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(q, qlab[:2], bank, lab, k=5)
    with pytest.raises(TypeError, match="query_labels"):
        knn_accuracy(q, qlab.float(), bank, lab, k=5)
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(q, qlab + 5, bank, lab, k=5, num_classes=3)


# --------------------------------------------------------------------------- #
# evaluate_knn                                                                 #
# --------------------------------------------------------------------------- #
class _Indexed(Dataset):
    """(image, target, index) triples, as lemniscate's instance datasets."""

    def __init__(self, x, y):
        self.x, self.targets = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.targets[i], i


def _loaders(shuffle):
    torch.manual_seed(1)
    C, D_in = 4, 12
    cent = torch.randn(C, D_in) * 3
    ytr, yte = torch.randint(0, C, (90,)), torch.randint(0, C, (30,))
    xtr, xte = cent[ytr] + torch.randn(90, D_in), cent[yte] + torch.randn(30, D_in)
    train = DataLoader(_Indexed(xtr, ytr), batch_size=16, shuffle=shuffle)
    test = DataLoader(TensorDataset(xte, yte), batch_size=8)                 # (image, target) pairs
    return train, test, (xtr, ytr, xte, yte)


def test_evaluate_knn_recomputed_features():
    train, test, (xtr, ytr, xte, yte) = _loaders(shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8))
    model.train()
    got = evaluate_knn(model, train, test, k=10, temperature=0.1, progress=False)
    assert model.training                                          # mode restored
    with torch.no_grad():
        ftr = torch.nn.functional.normalize(model(xtr), dim=1)
        fte = torch.nn.functional.normalize(model(xte), dim=1)
    ref = R.knn_topk_accuracy(R.knn_scores(fte, ftr, ytr, 10, 0.1, 4), yte)
    assert got == pytest.approx(ref)
    # a shuffled loader still puts every feature at its dataset index
    feats, labels = extract_features(model, train, progress=False)
    assert torch.equal(labels, ytr) and torch.allclose(feats, ftr, atol=1e-6)


def test_evaluate_knn_with_bank():
    train, test, (xtr, ytr, xte, yte) = _loaders(shuffle=False)
    model = torch.nn.Linear(12, 8)
    bank = _unit(90, 8)

    class Holder:
        memory = bank

    a = evaluate_knn(model, train, test, k=7, temperature=0.1, use_bank=bank, progress=True)
    b = evaluate_knn(model, train, test, k=7, temperature=0.1, use_bank=Holder(), progress=False)
    with torch.no_grad():
        fte = torch.nn.functional.normalize(model(xte), dim=1)
    ref = R.knn_topk_accuracy(R.knn_scores(fte, bank, ytr, 7, 0.1, 4), yte)
    assert a == pytest.approx(ref) and b == pytest.approx(ref)
    with pytest.raises(ValueError, match="rows"):
        evaluate_knn(model, train, test, k=7, use_bank=bank[:50], progress=False)
    with pytest.raises(TypeError, match="use_bank"):
        evaluate_knn(model, train, test, k=7, use_bank=3, progress=False)


def test_fast_paths_are_exercised(monkeypatch):
    # the group prefilters (first chunk, later chunks, chunks skipped outright, rows
    # redone on a tie) all run here, and the result is still the stable order
    seen = set()
    first, cand, select = K._first_select, K._candidates, K._select

    def first_spy(S, start, k):
        seen.add("first-group" if (S.shape[1] + K.GROUP - 1) // K.GROUP >= 4 * (k + 1) else "first-full")
        return first(S, start, k)

    def cand_spy(S, thr):
        v, g = cand(S, thr)
        seen.add("skip" if v is None else ("group" if g is not None else "full"))
        return v, g

    def select_spy(vals, kk, index_of):
        if vals.shape[1] > kk:
            tv = vals.topk(kk + 1, dim=1).values
            if bool((tv[:, kk] == tv[:, kk - 1]).any()):
                seen.add("tie-redo")
        return select(vals, kk, index_of)

    monkeypatch.setattr(K, "_first_select", first_spy)
    monkeypatch.setattr(K, "_candidates", cand_spy)
    monkeypatch.setattr(K, "_select", select_spy)
    q, _, bank, _ = _clustered(8, 6000, 16, 4)
    _, i = K.knn_topk(q, bank, 5, chunk_size=1024, query_batch=1)
    assert torch.equal(i, _stable_topk(q, bank, 5)[1])
    tq, tb = _tied_data()
    _, i = K.knn_topk(tq, tb, 3, chunk_size=120, query_batch=2)
    assert torch.equal(i, _stable_topk(tq, tb, 3)[1])
    assert {"first-group", "group", "skip", "tie-redo"} <= seen, seen


@pytest.mark.gpu
def test_knn_gpu_chunked_path():
    q, qlab, bank, lab = _clustered(300, 20000, 128, 10, spread=0.8)
    _, i = K.knn_topk(q.cuda(), bank.cuda(), 200, chunk_size=4096, query_batch=128)
    assert torch.equal(i.cpu(), _stable_topk(q, bank, 200)[1])
    got = knn_accuracy(q.cuda(), qlab.cuda(), bank.cuda(), lab.cuda(), k=200)
    ref = R.knn_topk_accuracy(R.knn_scores(q, bank, lab, 200, T, 10), qlab)
    assert got == pytest.approx(ref)
