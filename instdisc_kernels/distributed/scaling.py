"""Memory per GPU and bytes sent per GPU per step of the two bank modes
(the tables of docs/scaling.md): ``python -m instdisc_kernels.distributed.scaling``.

Counts follow the implementation in loss.py / _sharded.py. Collectives are
costed as ring algorithms: all_gather or reduce_scatter of an M-byte (total)
tensor sends (G-1)/G * M bytes per GPU, all_reduce 2 (G-1)/G * M, all_to_all
sends the (G-1)/G of its input that leaves the GPU. The model's DDP gradient
all_reduce is the same in both modes and not counted.
"""
from __future__ import annotations

GPU_MEMORY = 141e9                 # H200; an H100/A100 has 80e9


def bank_bytes(mode, n, g, d=128, bank_bytes_per=2):
    rows = n if mode == "replicated" else -(-n // g)
    return rows * d * bank_bytes_per


def step_buffer_bytes(mode, g, b=256, k=4096, d=128, feat_bytes=2):
    """Per-step temporaries of the distributed loss (not the model's activations)."""
    bg = b * g
    gathered = bg * (d * feat_bytes + 8)                    # all_gathered features + int64 indices
    if mode == "replicated":
        return gathered + 2 * gathered                      # gather buffers + cat
    entries = b * k                                         # expected entries per shard: B_g * K / G
    return (2 * gathered                                    # gather buffers + cat
            + bg * d * 4 * 2                                # fp32 features, fp32 partial gradient
            + entries * (20 + 16 + 6 * 4)                   # count draws; entry rows/cols; fp32 per-entry terms
            + (1 << 15) * d * 4 * 3)                        # one chunk of gathered rows (fp32 temporaries)


def comm_bytes(mode, g, b=256, k=4096, d=128, feat_bytes=2, loss_type="nce"):
    """Bytes sent per GPU per step by the distributed loss."""
    bg = b * g
    f = (g - 1) / g
    header = 32 * (g - 1)                                   # all_gather of 4 int64 (error flag, B, ...)
    total = header + f * bg * (d * feat_bytes + 8) + 2 * f * 8    # features + indices; loss all_reduce
    if mode == "sharded":
        total += f * b * g * 4                              # all_to_all of per-shard negative counts (int32)
        total += f * bg * d * 4                             # reduce_scatter of fp32 partial gradients
        if loss_type == "infonce":
            total += 2 * 2 * f * bg * 4                     # all_reduce of row max and row sum (B_g floats)
    return total


def _fmt(x):
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def markdown_tables(b=256, k=4096, d=128):
    sizes = (("1.28M", 1_281_167), ("100M", 100_000_000), ("1B", 1_000_000_000))
    gpus = (8, 64, 512)
    mem = ["| N | GPUs | replicated: bank / GPU | sharded: bank / GPU | replicated: step buffers "
           "| sharded: step buffers |", "| --- | --- | --- | --- | --- | --- |"]
    for name, n in sizes:
        for g in gpus:
            rb = bank_bytes("replicated", n, g, d)
            fits = rb + step_buffer_bytes("replicated", g, b, k, d) < GPU_MEMORY
            mem.append(f"| {name} | {g} | {_fmt(rb)}{'' if fits else ' (does not fit)'} "
                       f"| {_fmt(bank_bytes('sharded', n, g, d))} "
                       f"| {_fmt(step_buffer_bytes('replicated', g, b, k, d))} "
                       f"| {_fmt(step_buffer_bytes('sharded', g, b, k, d))} |")
    comm = ["| GPUs | global batch | replicated | sharded, NCE | sharded, InfoNCE |",
            "| --- | --- | --- | --- | --- |"]
    for g in gpus:
        comm.append(f"| {g} | {b * g} | {_fmt(comm_bytes('replicated', g, b, k, d))} "
                    f"| {_fmt(comm_bytes('sharded', g, b, k, d))} "
                    f"| {_fmt(comm_bytes('sharded', g, b, k, d, loss_type='infonce'))} |")
    head = (f"B = {b} per GPU, K = {k}, D = {d}; bf16 bank and features, fp32 partial gradients, "
            "int64 indices.")
    return "\n".join([head, "", "Memory per GPU:", ""] + mem + ["", "Bytes sent per GPU per step "
                      "(independent of N):", ""] + comm)


if __name__ == "__main__":
    print(markdown_tables())
