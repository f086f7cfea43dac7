"""Measurements beside the timings: the bandwidth probe and peak extra memory."""
from __future__ import annotations

import ctypes
import gc
import time

import torch
import torch.nn.functional as F

GATHER_BAG = 256        # rows summed per bag in the gather probe (output is 1/256 of the input)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, reps):
    """Fastest of ``reps`` timed calls (after one warm-up call), in seconds."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth_probe(device, nbytes, dim=128, reps=5):
    """What the machine can read: a streaming sum over ``nbytes`` and a gather of
    random rows of ``dim`` elements of the same bytes (fp32 rows and bf16 rows),
    summed in bags by embedding_bag so the writes stay small. GB/s = 1e9 bytes/s."""
    x = torch.rand(nbytes // 4, device=device)
    res = {"bytes": x.numel() * 4, "read_gbps": x.numel() * 4 / best_time(x.sum, device, reps) / 1e9,
           "gather_gbps": {}}
    for dt in (torch.float32, torch.bfloat16):
        rows = x.view(dt).view(-1, dim)
        R = rows.shape[0]
        idx = torch.randint(0, R, (R,), device=device)
        offsets = torch.arange(0, R, GATHER_BAG, device=device)
        t = best_time(lambda idx=idx, rows=rows, offsets=offsets: F.embedding_bag(idx, rows, offsets, mode="sum"),
                      device, reps)
        res["gather_gbps"][str(dim * rows.element_size())] = R * dim * rows.element_size() / t / 1e9
        del idx, offsets
    del x
    return res


def gemm_probe(device, n=2048, reps=5):
    """The machine's square-GEMM rate in GFLOP/s (2 n^3 per n x n x n torch.mm), fp32 and bf16."""
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        out[name] = 2 * n ** 3 / best_time(lambda a=a, b=b: torch.mm(a, b), device, reps) / 1e9
        del a, b
    return out


def probe_gbps(probe, kind, row_bytes):
    """The probe figure an op is compared with (gather: the probed row size nearest ``row_bytes``)."""
    if kind == "read":
        return probe["read_gbps"]
    sizes = sorted(probe["gather_gbps"], key=lambda s: abs(int(s) - row_bytes))
    return probe["gather_gbps"][sizes[0]]


# --------------------------------------------------------------------------- #
# Peak extra memory of one call                                                #
# --------------------------------------------------------------------------- #
def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _reset_hwm():
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 4096
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_memory(fn, device):
    """(bytes, method): memory one call of ``fn`` needs beyond what is already allocated.

    CUDA: torch.cuda.max_memory_allocated minus the allocated bytes before.
    CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs
    after returning freed heap pages with malloc_trim) minus the RSS before, so
    memory that bypasses torch's allocator (OpenMP scratch, std::vector) counts.
    (None, reason) when it cannot be measured.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"
    _malloc_trim()
    if not _reset_hwm():
        return None, "unavailable (/proc/self/clear_refs)"
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024, "VmHWM-VmRSS"
