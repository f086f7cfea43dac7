"""The fused C++ kNN kernel (csrc/cpu/knn.cpp) against the float64 oracle.

Its answer is the float64 top k (a bf16 or fp32 prefilter with a rigorous bound,
float64 rescore), so indices must equal the oracle's stable sort exactly. The
prefilter is the one of the CPU capability chosen at load (fp32 FMA tiles under
avx2/avx512, bf16 products under avx512_bf16); test_cpu_capability.py runs this
file again under each other prefilter the CPU has."""
import importlib.util
import os

import pytest
import torch

from helpers.knn_data import _clustered, _stable_topk, _tied_data, _unit
from instdisc_kernels import knn_predict
from instdisc_kernels import reference as R
from instdisc_kernels.ops import knn as K

pytestmark = pytest.mark.skipif(not K.TABLE.available("cpu", torch.device("cpu")),
                                reason="the C++ extension instdisc_kernels._C is not built")

def _check(q, bank, k, chunk=K.DEFAULT_CHUNK):
    v, i = K.knn_topk_cpp(q, bank, k, chunk_size=chunk)
    rv, ri = _stable_topk(q, bank, k)
    assert v.shape == (q.shape[0], k) and i.dtype == torch.int64
    assert v.dtype == (torch.float64 if torch.float64 in (q.dtype, bank.dtype) else torch.float32)
    assert torch.equal(i, ri)
    # float64 similarities, returned in the opmath dtype: only the final rounding differs
    rel = 1e-12 if v.dtype == torch.float64 else 2.0 ** -23
    assert ((v.double() - rv).abs() <= rel * rv.abs().clamp(min=1)).all()


SHAPES = [  # Q, N, D, k, chunk
    (1, 1, 1, 1, 64),            # the smallest call
    (7, 300, 100, 10, 64),       # N not a multiple of the chunk or of the 32-row tile
    (5, 50, 3, 50, 16),          # k = N, odd D
    (9, 1000, 129, 1, 100),      # k = 1, D = 129 (odd pair count)
    (17, 2000, 128, 200, 256),   # the default k, Q not a multiple of the 8-query tile
    (3, 17, 5, 17, 64),          # N < one tile
    (6, 90, 8, 40, 7),           # chunk < k: the lists fill over several chunks
    (65, 33, 16, 20, 32),        # Q over one 64-query block, N = one tile + 1
    (530, 203, 9, 7, 64),        # several fp32-prefilter blocks (up to 256 queries), the last partial
    (40, 1000, 100, 33, 4096),   # N over several 96-row sub-blocks, not a multiple of the 6-row tile
]


@pytest.mark.parametrize("Q,N,D,k,chunk", SHAPES)
def test_matches_oracle(Q, N, D, k, chunk):
    q, _, bank, _ = _clustered(Q, N, D, 5)
    _check(q, bank, k, chunk)


@pytest.mark.parametrize("qdtype,bdtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float64, torch.float64), (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)])
def test_dtypes(qdtype, bdtype):
    # stored values are upcast exactly: the oracle sees the same numbers
    q, _, bank, _ = _clustered(11, 700, 32, 4)
    _check(q.to(qdtype), bank.to(bdtype), 25, chunk=128)


def test_differences_below_bf16_resolution():
    # bank rows that bf16 rounds to the same vector but that differ in fp32: the
    # prefilter cannot rank them, the bound must keep all of them for the rescore
    base = _unit(1, 64)[0]
    direction = _unit(1, 64)[0]
    steps = torch.randperm(400).double()
    bank = torch.nn.functional.normalize(base + 1e-6 * steps[:, None] * direction, dim=1).float()
    bank = torch.cat([bank, _unit(600, 64).float()])
    q = torch.stack([base, direction, (base + direction) / 2]).float()
    # ranking by bf16 similarities alone would be wrong
    bf16_rank = (q.bfloat16().double() @ bank.bfloat16().double().t()).topk(150, dim=1).indices
    assert not torch.equal(bf16_rank.sort(1).values, _stable_topk(q, bank, 150)[1].sort(1).values)
    _check(q, bank, 150)


def test_differences_below_fp32_resolution():
    # float64 bank rows whose similarities differ by less than fp32 resolves: the fp32 prefilter
    # cannot rank them, the bound must keep all of them for the float64 rescore
    base = _unit(1, 48)[0]
    direction = _unit(1, 48)[0]
    steps = torch.randperm(300).double()
    bank = torch.nn.functional.normalize(base + 1e-11 * steps[:, None] * direction, dim=1)
    bank = torch.cat([bank, _unit(500, 48)])
    q = torch.stack([direction, (base + direction) / 2])
    fp32_rank = (q.float().double() @ bank.float().double().t()).topk(120, dim=1).indices
    assert not torch.equal(fp32_rank.sort(1).values, _stable_topk(q, bank, 120)[1].sort(1).values)
    _check(q, bank, 120)


@pytest.mark.parametrize("order", ["ascending", "descending", "equal"])
def test_adversarial_orders(order):
    # ascending: every row enters the running top k (most threshold updates and
    # histogram rebuilds); equal: every similarity ties
    q = _unit(3, 32).float()
    bank = _unit(3000, 32).float()
    if order == "equal":
        bank = bank[:1].expand(3000, 32).contiguous()
    else:
        sim = bank.double() @ q[0].double()
        bank = bank[sim.argsort(descending=order == "descending")].contiguous()
    for k in (1, 64, 300):
        _check(q, bank, k, chunk=1000)


def test_ties_lower_index_first():
    q, bank = _tied_data()
    for k in (1, 5, 40, 41, 120):
        _, i = K.knn_topk_cpp(q, bank, k, chunk_size=33)
        assert torch.equal(i, _stable_topk(q, bank, k)[1]), k


def test_scaled_rows():
    # the bound scales with the norms: rows far from unit length
    q, _, bank, _ = _clustered(9, 500, 24, 3)
    _check(q * 1e3, bank * torch.logspace(-3, 3, 500)[:, None], 30)


def test_larger_data():
    q, _, bank, _ = _clustered(200, 6000, 128, 10, spread=0.7)
    a = K.knn_topk_cpp(q, bank, 200)
    assert torch.equal(a[1], _stable_topk(q, bank, 200)[1])


def test_knn_predict_backends_agree():
    q, _, bank, lab = _clustered(20, 900, 16, 6)
    ref = R.knn_scores(q, bank, lab, 40, 0.07, 6)
    for backend in ("cpu", "auto", "eager"):
        sc = knn_predict(q, bank, lab, k=40, num_classes=6, backend=backend)
        assert ((sc.double() - ref).abs() <= 2e-5 * ref.abs().amax(1, keepdim=True)).all(), backend
    assert K.TABLE.select("cpu", q.device) == "cpu"
    assert K.TABLE.select("auto", q.device) == ("cpu" if K._CPU_FAST else "eager")


def test_non_finite_similarities_are_an_error():
    q, _, bank, lab = _clustered(4, 100, 8, 2)
    q[1, 0] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        knn_predict(q, bank, lab, k=5, backend="cpu")
    with pytest.raises(ValueError, match="query 1 is not finite"):   # validate=False: the kernel refuses
        knn_predict(q, bank, lab, k=5, backend="cpu", validate=False)
    q[1, 0] = 0
    bank[7, 3] = float("inf")
    with pytest.raises(ValueError, match="bank row 7 is not finite"):
        knn_predict(q, bank, lab, k=5, backend="cpu", validate=False)


def test_opcheck():
    q, _, bank, _ = _clustered(5, 120, 12, 3)
    torch.library.opcheck(torch.ops.instdisc.knn_topk.default, (q, bank, 7, 50))
    torch.library.opcheck(torch.ops.instdisc.knn_topk.default, (q.double(), bank.bfloat16(), 7, 50))


# --------------------------------------------------------------------------- #
# Memory: no Q x N buffer, measured as the benchmarks measure it (peak resident #
# set: C++ allocations are invisible to torch's allocator hooks)               #
# --------------------------------------------------------------------------- #
def _bench_measure():
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "bench_measure.py")
    spec = importlib.util.spec_from_file_location("bench_measure", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_memory_has_no_q_by_n_term():
    peak = _bench_measure().peak_extra_memory
    cpu = torch.device("cpu")
    probe, why = peak(lambda: None, cpu)
    if probe is None:
        pytest.skip(f"peak RSS cannot be measured here: {why}")
    Q, N, D, k = 1500, 40_000, 16, 50
    q, bank = _unit(Q, D).float(), _unit(N, D).float()
    qxn = Q * N * 4
    eager, _ = peak(lambda: (q @ bank.t()).topk(k, dim=1), cpu)
    assert eager >= qxn * 0.9                  # the detector sees a Q x N matrix
    out = []
    fused, _ = peak(lambda: out.append(K.knn_topk_cpp(q, bank, k)), cpu)
    assert fused < qxn / 8, (fused, qxn)
    assert torch.equal(out[0][1][:50], _stable_topk(q[:50], bank, k)[1])


def test_same_answer_for_any_thread_count():
    q, _, bank, _ = _clustered(300, 3000, 32, 10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.knn_topk_cpp(q, bank, 50)
        torch.set_num_threads(max(2, threads))
        many = K.knn_topk_cpp(q, bank, 50)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert torch.equal(one[1], _stable_topk(q, bank, 50)[1])
