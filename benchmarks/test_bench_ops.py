"""The benchmarks: one test per op, parametrized by (case, provider) in
benchmarks/conftest.py (eager baseline first for every case)."""


def test_nce(benchmark, bench, case, provider):
    """NCE forward + backward + bank update (docs/method.md#noise-contrastive-estimation-nce)."""
    bench.run(benchmark, case, provider)


def test_nce_shared(benchmark, bench, case, provider):
    """NCE with one set of K shared negatives per step (ops/nce_shared.py): forward + backward + update."""
    bench.run(benchmark, case, provider)


def test_softmax(benchmark, bench, case, provider):
    """Exact non-parametric softmax loss + gradient + bank update (docs/method.md#the-exact-non-parametric-softmax)."""
    bench.run(benchmark, case, provider)


def test_knn(benchmark, bench, case, provider):
    """Weighted kNN top-1/top-5 over all queries (docs/method.md#evaluation-weighted-k-nearest-neighbours)."""
    bench.run(benchmark, case, provider)


def test_bank_update(benchmark, bench, case, provider):
    """Memory-bank momentum update alone."""
    bench.run(benchmark, case, provider)


def test_knn_search(benchmark, bench, case, provider):
    """Exact top-k inner-product search alone (knn_search; FAISS IndexFlatIP as the peer)."""
    bench.run(benchmark, case, provider)


def test_lemniscate_nce(benchmark, bench, case, provider):
    """A lemniscate training step: NCEAverage + NCECriterion, backward (original-style modules vs drop-ins)."""
    bench.run(benchmark, case, provider)


def test_lemniscate_linear(benchmark, bench, case, provider):
    """A lemniscate training step: LinearAverage + CrossEntropyLoss, backward (original vs drop-in)."""
    bench.run(benchmark, case, provider)
