"""Memory-bank storage on 2 MiB pages (Linux transparent huge pages).

The NCE kernels read B*(K+1) random rows of the bank per step. With 4 KiB
pages a 656 MB bank (ImageNet, fp32) spans 160,000 pages, far more than the
TLB holds, so nearly every row read also walks the page table. On 2 MiB pages
the same bank spans 313 pages. ``empty_rows`` allocates a CPU bank on anonymous
memory aligned to 2 MiB and asks the kernel for huge pages with
``madvise(MADV_HUGEPAGE)``. Where the OS does not allow it (THP set to
"never", not Linux, a small bank, another device) it silently returns an
ordinary ``torch.empty`` tensor: huge pages change speed, never results.

benchmarks/ measures the effect side by side (``fused-cpu`` on a huge-page bank
against the same kernel on an ordinary one).
"""
from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE        # smaller banks: torch.empty (the TLB already covers them)
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: "always", "madvise", "never" or "unavailable"."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    chosen = text[text.find("[") + 1:text.find("]")] if "[" in text else ""
    return chosen if chosen in ("always", "madvise", "never") else "unavailable"


def available() -> bool:
    """Whether ``empty_rows`` can put a bank on huge pages on this machine."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def _huge_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes on 2 MiB-aligned anonymous memory advised MADV_HUGEPAGE."""
    length = nbytes + HUGE_PAGE                       # room to align the start
    buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(view)
    del view                                         # release the export (buf stays open)
    offset = (-address) % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, offset, ((length - offset) // mmap.PAGESIZE) * mmap.PAGESIZE)
    # the tensor keeps ``buf`` alive: the mapping is unmapped when the last view is freed
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)


def empty_rows(num_rows: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialised contiguous (num_rows, dim) tensor; on CPU, on huge pages when possible."""
    device = torch.device("cpu") if device is None else torch.device(device)
    nbytes = num_rows * dim * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < MIN_BYTES or not available():
        return torch.empty(num_rows, dim, dtype=dtype, device=device)
    try:
        raw = _huge_tensor(nbytes)
    except (OSError, ValueError, OverflowError, TypeError):
        return torch.empty(num_rows, dim, dtype=dtype, device=device)
    return raw.view(dtype).view(num_rows, dim)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s mapping backed by huge pages (AnonHugePages in /proc/self/smaps); 0 if unknown."""
    start = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= start < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
