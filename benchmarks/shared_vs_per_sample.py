"""Interleaved timing of one training step (loss, backward, bank update): per-sample fused NCE
at K=4096 against shared negatives at K=4096 and 65,536 (backends eager and cpu, i.e. ATen's
elementwise epilogue and the C++ tile epilogue; fp32 and bf16 products) and a plain torch.mm of
the same two GEMM shapes, N=50,000, B=256, D=128, fp32 bank, fixed Z. The providers alternate
within each round, so a busy machine slows them alike; medians of --rounds.

    python benchmarks/shared_vs_per_sample.py --threads 1
"""
import argparse
import time

import torch

import instdisc_kernels as ik

N, B, D, T = 50_000, 256, 128, 0.1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mem = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    y = torch.randperm(N)[:B]

    def step(**kw):
        def run():
            x.grad = None
            ik.nce_loss(x, mem, y, temperature=T, z=5e4, validate=False, **kw).backward()
        return run

    def mm(K):
        G, W, xd = torch.randn(K, D), torch.randn(B, K), x.detach()
        return lambda: (torch.mm(xd, G.t()), torch.mm(W, G))

    steps = {"per-sample K=4096": step(num_negatives=4096, backend="cpu")}
    for K in (4096, 65536):
        for be in ("eager", "cpu"):
            steps[f"shared K={K} {be}"] = step(num_negatives=K, negatives="shared", backend=be)
            steps[f"shared K={K} {be} bf16"] = step(num_negatives=K, negatives="shared", backend=be,
                                                   precision="bf16")
        steps[f"torch.mm K={K}"] = mm(K)
    times = {k: [] for k in steps}
    for f in steps.values():
        f()
    for _ in range(a.rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ps = med["per-sample K=4096"]
    print(f"threads={a.threads}, median of {a.rounds} rounds")
    for k, t in med.items():
        K = int(k.split("K=")[1].split()[0]) if "K=" in k else 0
        rate = f"{4 * B * K * D / t / 1e9:7.1f} GFLOP/s" if not k.startswith("per-sample") else " " * 15
        print(f"{k:<28}{t * 1e3:10.1f} ms  {rate}  per-sample/this {ps / t:6.2f}")


if __name__ == "__main__":
    main()
