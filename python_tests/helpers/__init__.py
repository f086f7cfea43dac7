"""Helpers shared by test files of several folders (imported as ``helpers.<module>``: pytest puts
python_tests/ on sys.path when it loads python_tests/conftest.py).

alloc          AllocTracker: the tensors ATen allocates (no B x N / B x K / Q x N buffers)
bitrot         flip_bytes_of: damage a tensor's bytes inside a saved file
knn_data       kNN query/bank data (unit rows, clustered classes, exact ties), stable top-k
process_group  gloo process groups on CPU: _launch, _serve, Checks, _assert_ok, _batch
train_runs     the flags of a tiny instdisc-train digits run, its metrics.jsonl reader
"""
