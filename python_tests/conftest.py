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
