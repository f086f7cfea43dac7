import os

# Triton kernels run on CPU tensors through the interpreter; this must be set
# before any @triton.jit function is defined or launched.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Loading this file puts python_tests/ on sys.path (pytest's default "prepend" import mode), so
# the test files of the per-op folders import the shared code as `helpers.<module>`; test files
# are imported by basename, so their names must stay unique across folders.


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs in benchmarks/run_gpu.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- #
# The Triton kernels' in-kernel negatives, for tests (not part of the library)  #
# --------------------------------------------------------------------------- #
try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402

    from instdisc_kernels.ops.nce_triton import _draw_negatives  # noqa: E402
except ImportError:
    triton = None
else:
    @triton.jit(do_not_specialize=["N"])
    def _triton_draws_kernel(out_ptr, seed_ptr, y_ptr, N, K, EXCLUDE: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        offs_k = 1 + tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        y = tl.load(y_ptr + b)
        v = _draw_negatives(tl.load(seed_ptr), b, offs_k, N, y, EXCLUDE)
        tl.store(out_ptr + b.to(tl.int64) * K + (offs_k - 1), v, mask=offs_k <= K)


def _triton_draws(indices, num_samples, num_negatives, seed, exclude_positive=False):
    """(B, K) int64: the negatives nce_forward_triton draws in-kernel for this seed (same device function)."""
    B = indices.shape[0]
    out = torch.empty(B, num_negatives, dtype=torch.int64, device=indices.device)
    block_k = min(1024, max(16, triton.next_power_of_2(num_negatives)))
    _triton_draws_kernel[(B, triton.cdiv(num_negatives, block_k))](
        out, seed.reshape(1).to(torch.int64), indices.long().contiguous(), num_samples, num_negatives,
        EXCLUDE=bool(exclude_positive), BLOCK_K=block_k)
    return out


@pytest.fixture
def triton_negatives():
    """``draw(indices, N, K, seed, exclude_positive=False)``: the Triton kernels' in-kernel negatives."""
    if triton is None:
        pytest.skip("triton is not installed")
    return _triton_draws
