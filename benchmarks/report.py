"""Turn pytest-benchmark JSON files of benchmarks/ into benchmarks/RESULTS.md and
benchmarks/speedup.png.

    python benchmarks/report.py cpu.json [gpu.json ...] --out benchmarks/RESULTS.md \
        --plot benchmarks/speedup.png

With no JSON it writes the skeleton (every device pending). A device type
(cpu / cuda) without a JSON is listed as pending.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

OPS = ("nce", "nce_shared", "softmax", "knn", "knn_search", "bank_update")   # the plot's panels
TABLE_OPS = OPS + ("lemniscate_nce", "lemniscate_linear")                     # plus the drop-in steps (tables only)
OP_TITLE = {"lemniscate_nce": "lemniscate drop-in step: NCEAverage + NCECriterion (original-style modules = eager)",
            "lemniscate_linear": "lemniscate drop-in step: LinearAverage + CrossEntropyLoss (original-style = eager)",
            "nce": "NCE forward + backward + bank update",
            "nce_shared": "NCE, K negatives shared by the batch: forward + backward + update",
            "softmax": "exact softmax loss + gradient + update",
            "knn": "weighted kNN (top-1/top-5 over all queries)", "knn_search": "exact top-k search alone",
            "bank_update": "bank update alone"}
OP_X = {"nce": "K (negatives)", "nce_shared": "K (shared negatives)", "softmax": "N (bank rows)", "knn": "N (train features)",
        "knn_search": "N (bank rows)", "bank_update": "N (bank rows)"}
# competitors (torch-mm: the GEMMs alone): "vs peer" = peer time / provider time
PEERS = ("faiss", "torch-lce", "torch-mm")
GATHER_LIMIT = "embedding_bag"          # the gather probe: "% embag" = its time / provider time

# (label, device type, op, case ids, provider, metric, minimum): vs_peer is the peer's time over the
# provider's (times faster), pct_* a percentage of the machine's limit
PEER_TARGETS = [
    ("kNN 10k x 50k, k=200 vs FAISS flat + vote", "cpu", "knn",
     ("N50000-Q10000-k200-C10-D128-fp32", "N50000-Q10000-k200-C10-D128-fp32-clustered"), "fused-cpu", "vs_peer", 3.0),
    ("kNN 1k x 1.28M, k=200 vs FAISS flat + vote", "cpu", "knn",
     ("N1281167-Q1000-k200-C1000-D128-fp32", "N1281167-Q1000-k200-C1000-D128-fp32-clustered"), "fused-cpu",
     "vs_peer", 3.0),
    ("exact softmax, N=1.28M, B=256 vs linear_cross_entropy", "cpu", "softmax",
     ("N1281167-B256-D128-fp32",), "fused-cpu", "vs_peer", 20.0),
    ("shared-negative NCE at the rate of torch.mm of the same shapes (0.7 = 70%)", "cpu", "nce_shared",
     ("N50000-B256-K4096-D128-fp32", "N50000-B256-K65536-D128-fp32"), "fused-cpu", "vs_peer", 0.7),
]
# (label, device type, (op, case, provider) measured, (op, case, provider) compared with, minimum of
# the compared row's time over the measured row's), both from the same run
CROSS_TARGETS = [
    ("shared K=4096 vs per-sample fused NCE at K=4096 (times faster)", "cpu",
     ("nce_shared", "N50000-B256-K4096-D128-fp32", "fused-cpu"), ("nce", "N50000-B256-K4096-D128-fp32", "fused-cpu"),
     5.0),
    ("shared K=65,536 within 2x the time of per-sample fused K=4096 (0.5 = 2x)", "cpu",
     ("nce_shared", "N50000-B256-K65536-D128-fp32", "fused-cpu"), ("nce", "N50000-B256-K4096-D128-fp32", "fused-cpu"),
     0.5),
]
LIMIT_TARGETS = [
    ("kNN at the bf16 GEMM rate", "cpu", "knn",
     ("N50000-Q10000-k200-C10-D128-fp32", "N50000-Q10000-k200-C10-D128-fp32-clustered",
      "N1281167-Q1000-k200-C1000-D128-fp32", "N1281167-Q1000-k200-C1000-D128-fp32-clustered"),
     "fused-cpu", "pct_of_gemm", 60.0),
    ("exact softmax fp32 at the fp32 GEMM rate", "cpu", "softmax", ("N1281167-B256-D128-fp32",), "fused-cpu",
     "pct_of_gemm", 75.0),
    ("exact softmax bf16 precision at the bf16 GEMM rate", "cpu", "softmax", ("N1281167-B256-D128-fp32",),
     "fused-cpu+bf16", "pct_of_gemm", 70.0),
    ("NCE at the embedding_bag rate over its rows", "cpu", "nce",
     ("N50000-B256-K4096-D128-fp32", "N1281167-B256-K4096-D128-fp32", "N50000-B256-K4096-D128-bf16"),
     "fused-cpu", "pct_of_embag", 60.0),
]

# (label, device type, op, case id, minimum speedup, minimum peak-memory ratio), from the kernel issues
TARGETS = [
    ("NCE, N=50k, B=256, K=4096, fp32", "cpu", "nce", "N50000-B256-K4096-D128-fp32", 5.0, 20.0),
    ("NCE, N=1.28M, B=256, K=4096, fp32", "cpu", "nce", "N1281167-B256-K4096-D128-fp32", 3.0, 20.0),
    ("exact softmax, N=1.28M, B=256, fp32", "cpu", "softmax", "N1281167-B256-D128-fp32", 2.0, 50.0),
    ("kNN, 10k queries x 50k train, k=200", "cpu", "knn", "N50000-Q10000-k200-C10-D128-fp32", 3.0, None),
    ("drop-in NCEAverage + NCECriterion, N=50k, B=128, K=4096", "cpu", "lemniscate_nce",
     "N50000-B128-K4096-D128-fp32", 10.0, None),
    ("drop-in LinearAverage, N=50k, B=128", "cpu", "lemniscate_linear", "N50000-B128-D128-fp32", 1.0, 1.0),
]

HOW_TO = """\
## How these numbers are produced

* CPU, on a quiet machine (nothing else running; about 5-10 minutes on 2 cores):

      .venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/cpu.json

  `--bench-size=full` adds the large shapes and the torch.compile provider
  (skipped on CPU below full: 6-40 s of C++ compilation per graph, several graphs
  per op; `--bench-compile` forces it). `--bench-backends=cpu,eager` adds the
  library's eager backend as a provider (docs/backends.md).
* GPU: `bash benchmarks/run_gpu.sh OUTDIR` on the GPU machine (build, GPU tests,
  Triton tests on CUDA, GPU benchmarks in under 8 minutes; writes OUTDIR/bench.json,
  OUTDIR/bench_compile.json, OUTDIR/summary.md, OUTDIR/speedup.png).
* This page and the plot:

      .venv/bin/python benchmarks/report.py benchmarks/cpu.json [OUTDIR/bench.json OUTDIR/bench_compile.json] \\
          --out benchmarks/RESULTS.md --plot benchmarks/speedup.png

Definitions: *time* is the pytest-benchmark median of one whole step (NCE and softmax:
negative draw, loss, backward to the features, bank update; kNN: top-1/top-5 of all
queries; bank update: B rows). *Speedup* divides the eager baseline's median by the
provider's, both from the same run. *GB/s* is the bank bytes the op must read at least
once (NCE: B*(K+1)*D rows; softmax, kNN: N*D; update: B*D) over the time, and *% probe*
compares it with the session's bandwidth probe (random-row gather of rows of the same
size for NCE and the update, a streaming read for softmax and kNN). *Peak MB* is the
extra memory of one step beyond its inputs (CUDA: max_memory_allocated minus allocated
before; CPU: peak RSS minus RSS before); *mem ratio* is eager peak / provider peak.
Compute-bound ops (softmax: 4*B*N*D FLOP for the two products; shared-negative NCE:
4*B*K*D; kNN and the search: 2*Q*N*D) show *GFLOP/s* and *% GEMM*, the fraction of the square-GEMM rate measured in
the same run (2048^3 torch.mm; the kNN ops and the bf16-precision softmax against the
bf16 rate, the rest against fp32). Gather-bound ops (NCE, update) show *% embag*: the
time of `F.embedding_bag(idx, bank, offsets, mode="sum")` over the same number of random
rows of the same bank (the `embedding_bag` row) over the provider's time; for this library's
own rows (not `+4k`), when the JSON has it, the paired figure instead: after the timed rounds,
9 rounds of one provider call then one `embedding_bag` call, the ratio of the two medians
(immune to the machine's state moving between the two rows). *vs peer* is the
peer's time (FAISS for kNN and the search, linear_cross_entropy for the softmax) over the
provider's, same case, same run.
Providers: `eager` (lemniscate-style baseline, benchmarks/bench_baselines.py),
`fused-<backend>` (this library on that backend, docs/backends.md, `validate=False`; an op
without a kernel for the device's backend runs its `eager` backend; the softmax's and the
shared negatives' `fused-cpu` are ATen's GEMMs with the C++ tile epilogues; `+bf16`: the
softmax and the shared negatives with `precision="bf16"`, bf16 products with fp32 accumulation,
against the default fp32 products), `faiss` (faiss-cpu
`IndexFlatIP`, the add + search + the same vote; the search alone for knn_search),
`torch-lce` (`linear_cross_entropy` with `LinearCrossEntropyOptions()`,
gradient to the features, the eager update), `embedding_bag` (the gather probe; see
benchmarks/bench_peers.py), `torch-mm` (the shared-negative step's two products alone: torch.mm
of the same shapes on ready inputs), `compile` (torch.compile of the eager baseline). The
lemniscate_* ops compare lemniscate's own modules written out eagerly (`eager`,
benchmarks/bench_lemniscate.py) with the drop-in modules of instdisc_kernels.lemniscate
(`fused-<backend>`, input checks included) on a whole training step. A provider missing from
a table was skipped (the pytest output says why).
"""


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        e = dict(b.get("extra_info", {}))
        if "op" not in e or "time_median_s" not in e:
            continue
        e["time_median_s"] = b["stats"]["median"]
        rows.append(e)
    meta = data.get("instdisc", {})
    meta["datetime"] = data.get("datetime", "?")
    meta["commit"] = data.get("commit_info", {})
    meta["machine"] = data.get("machine_info", {})
    meta["path"] = path
    meta["device_type"] = meta.get("device", "cpu").split(":")[0]
    _ratios(rows)
    _gemm_fractions(rows, (meta.get("probe") or {}).get("gemm_gflops") or {})
    return meta, rows


def gemm_rate_dtype(wants_bf16, rates):
    """The square-GEMM rate a compute-bound row is held against: bf16 when the row multiplies in
    bf16 and bf16 is the machine's faster GEMM, else fp32. Without native bf16 GEMMs (no
    AVX512-BF16/AMX, e.g. AVX2) ATen's bf16 matmul is a slow fallback and the library multiplies
    the bf16-rounded operands in fp32 (ops/_formulas.py), so fp32 is the limit there."""
    return "bf16" if wants_bf16 and rates.get("bf16", 0) > rates.get("fp32", 0) else "fp32"


def _gemm_fractions(rows, rates):
    """% GEMM recomputed from each row's GFLOP/s and the run's rates, by gemm_rate_dtype."""
    for r in rows:
        if r.get("gflops") is None or not rates:
            continue
        dt = gemm_rate_dtype(r.get("gemm_dtype") == "bf16", rates)
        r["gemm_dtype"], r["pct_of_gemm"] = dt, 100.0 * r["gflops"] / rates[dt]


def _ratios(rows):
    """Speedup and memory ratio against the eager row of the same case, the peer ratio and the
    fraction of the gather probe (recomputed from the JSON)."""
    by = {(r["op"], r["case"], r["provider"]): r for r in rows}
    eager = {(r["op"], r["case"]): r for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["case"]))
        r["speedup"] = e["time_median_s"] / r["time_median_s"] if e else None
        peer = next((by[(r["op"], r["case"], p)] for p in PEERS if (r["op"], r["case"], p) in by), None)
        r["vs_peer"] = (peer["time_median_s"] / r["time_median_s"]) if peer and peer is not r else None
        r["peer"] = peer["provider"] if peer else None
        lim = by.get((r["op"], r["case"], GATHER_LIMIT))
        r["pct_of_embag"] = 100.0 * lim["time_median_s"] / r["time_median_s"] if lim and lim is not r else None
        if r.get("paired_pct_of_embag") is not None:   # interleaved with embedding_bag (conftest.py)
            r["pct_of_embag"] = r["paired_pct_of_embag"]
        pe, pr = (e or {}).get("peak_extra_bytes"), r.get("peak_extra_bytes")
        # a ratio of two near-zero peaks means nothing; a zero peak counts as one 4 KiB page
        ok = pe is not None and pr is not None and pe >= 2**20
        r["mem_ratio"] = pe / max(pr, 4096) if ok else None


def _f(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def header(meta):
    c, m = meta["commit"], meta["machine"]
    probe = meta.get("probe") or {}
    gat = ", ".join(f"{k} B rows {v:.1f}" for k, v in (probe.get("gather_gbps") or {}).items())
    lines = [
        f"* machine: {meta.get('device_name', '?')} ({meta.get('device', '?')}; {meta.get('cpu_count', '?')} CPUs, "
        f"{meta.get('threads', '?')} torch threads; {m.get('node', '?')}, Python {m.get('python_version', '?')}, "
        f"torch {meta.get('torch', '?')})",
        f"* date: {meta['datetime']}",
        f"* commit: {c.get('id', '?')[:12]}{' (dirty tree)' if c.get('dirty') else ''} on {c.get('branch', '?')}",
        f"* command: `{meta.get('command', '?')}` (size set: {meta.get('bench_size', '?')})",
    ]
    if probe:
        lines.append(f"* bandwidth probe ({probe.get('bytes', 0) >> 20} MiB): streaming read "
                     f"{probe.get('read_gbps', 0):.1f} GB/s; random-row gather {gat} GB/s")
    if probe.get("gemm_gflops"):
        rates = probe["gemm_gflops"]
        gm = ", ".join(f"{k} {v:.3g}" for k, v in rates.items())
        slow = "" if gemm_rate_dtype(True, rates) == "bf16" else (
            " (no native bf16 GEMM here: the bf16 rows are held against the fp32 rate, see gemm_rate_dtype)")
        lines.append(f"* square-GEMM rate ({probe.get('gemm_n')}^3 torch.mm, same run): {gm} GFLOP/s{slow}")
    return "\n".join(lines)


def op_table(rows, op):
    rs = [r for r in rows if r["op"] == op]
    if not rs:
        return ""
    compute = any(r.get("gflops") is not None for r in rs)
    gather = any(r.get("pct_of_embag") is not None for r in rs)
    peers = any(r.get("vs_peer") is not None for r in rs)
    cols = ["case", "provider", "median ms", "speedup"] + (["vs peer"] if peers else []) + ["GB/s", "% probe"]
    cols += (["GFLOP/s", "% GEMM"] if compute else []) + (["% embag"] if gather else []) + ["peak MB", "mem ratio"]
    out = [f"#### {OP_TITLE[op]}", "", "| " + " | ".join(cols) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in cols[2:]) + " |"]
    for r in rs:
        peak = r.get("peak_extra_bytes")
        cells = [r["case"], r["provider"], f"{r['time_median_s'] * 1e3:.3f}", _f(r["speedup"], ".2f", "x")]
        if peers:
            cells.append(_f(r.get("vs_peer"), ".2f", "x"))
        cells += [_f(r.get("gbps"), ".3g"), _f(r.get("pct_of_probe"), ".2g", "%")]
        if compute:
            pct = r.get("pct_of_gemm")
            cells += [_f(r.get("gflops"), ".4g"), "-" if pct is None else f"{pct:.2g}% {r.get('gemm_dtype')}"]
        if gather:
            cells.append(_f(r.get("pct_of_embag"), ".2g", "%"))
        cells += [_f(None if peak is None else peak / 2**20, ".3g"), _f(r["mem_ratio"], ".3g", "x")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def targets_table(runs):
    out = ["| target | provider | speedup (need) | mem ratio (need) | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for label, dev, op, case, need_s, need_m in TARGETS:
        rows = [r for meta, rs in runs if meta["device_type"] == dev for r in rs
                if r["op"] == op and r["case"] == case and r["provider"].startswith("fused-")]
        if not rows:
            out.append(f"| {label} ({dev}) | - | - ({need_s:g}x) | - ({_f(need_m, 'g', 'x')}) | pending: not measured |")
            continue
        for r in rows:
            ok_s = r["speedup"] is not None and r["speedup"] >= need_s
            ok_m = need_m is None or (r["mem_ratio"] is not None and r["mem_ratio"] >= need_m)
            verdict = "met" if ok_s and ok_m else "NOT met"
            out.append(f"| {label} ({dev}) | {r['provider']} | {_f(r['speedup'], '.2f', 'x')} ({need_s:g}x) "
                       f"| {_f(r['mem_ratio'], '.3g', 'x')} ({_f(need_m, 'g', 'x')}) | {verdict} |")
    return "\n".join(out) + "\n"


def _find(runs, dev, op, case, provider):
    return [r for meta, rs in runs if meta["device_type"] == dev for r in rs
            if r["op"] == op and r["case"] == case and r["provider"] == provider]


def limit_targets_table(targets, runs):
    """One row per (target, case): the metric of the named provider against its minimum."""
    out = ["| target | case | provider | achieved (need) | verdict |", "| --- | --- | --- | ---: | --- |"]
    for label, dev, op, cases, provider, metric, need in targets:
        unit = "%" if metric.startswith("pct") else "x"
        for case in cases:
            got = [r for r in _find(runs, dev, op, case, provider) if r.get(metric) is not None]
            if not got:
                out.append(f"| {label} ({dev}) | {case} | {provider} | - ({need:g}{unit}) | pending: not measured |")
            for r in got:
                out.append(f"| {label} ({dev}) | {case} | {provider} | {r[metric]:.{0 if unit == '%' else 2}f}{unit} "
                           f"({need:g}{unit}) | {'met' if r[metric] >= need else 'NOT met'} |")
    return "\n".join(out) + "\n"


def cross_targets_table(runs):
    out = ["| target | run | ratio (need) | verdict |", "| --- | --- | ---: | --- |"]
    for label, dev, (op, case, prov), (op2, case2, prov2), need in CROSS_TARGETS:
        done = False
        for meta, rs in runs:
            if meta["device_type"] != dev:
                continue
            mine = [r for r in rs if (r["op"], r["case"], r["provider"]) == (op, case, prov)]
            other = [r for r in rs if (r["op"], r["case"], r["provider"]) == (op2, case2, prov2)]
            if mine and other:
                ratio = other[0]["time_median_s"] / mine[0]["time_median_s"]
                out.append(f"| {label} ({dev}) | {meta.get('path', '?')} | {ratio:.2f} ({need:g}) | "
                           f"{'met' if ratio >= need else 'NOT met'} |")
                done = True
        if not done:
            out.append(f"| {label} ({dev}) | - | - ({need:g}) | pending: not measured |")
    return "\n".join(out) + "\n"


def auto_choice(runs):
    """Which fused CUDA provider won most cases, per op (the evidence _backend.CUDA_PREFERENCE waits for)."""
    out = []
    for meta, rows in runs:
        if meta["device_type"] != "cuda":
            continue
        for op in OPS:
            wins = collections.Counter()
            for case in sorted({r["case"] for r in rows if r["op"] == op}):
                fused = [r for r in rows if r["op"] == op and r["case"] == case
                         and r["provider"].startswith("fused-") and "+" not in r["provider"]]
                if fused:
                    wins[min(fused, key=lambda r: r["time_median_s"])["provider"]] += 1
            if wins:
                out.append(f"* {op}: fastest fused provider per case: "
                           + ", ".join(f"{p} {n}" for p, n in wins.most_common()))
    return "\n".join(out) if out else "* pending: no GPU run recorded yet."


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))   # one panel per op (6)
    for ax in axes.flat[len(OPS):]:
        ax.axis("off")
    for ax, op in zip(axes.flat, OPS):
        series = collections.defaultdict(list)
        for meta, rows in runs:
            for r in rows:
                if (r["op"] == op and r["provider"] not in ("eager", GATHER_LIMIT) and r["speedup"] is not None):
                    x = r["K"] if op in ("nce", "nce_shared") else r["N"]
                    if op in ("nce", "nce_shared"):
                        what = f"N={r['N']} B={r['B']} {r['dtype']}"
                    elif op in ("knn", "knn_search"):   # one line per class count and data kind
                        classes = next((p for p in r["case"].split("-") if p.startswith("C")), "")
                        data = "clustered" if r["case"].endswith("-clustered") else "random"
                        what = f"Q={r['B']} {classes} {r['dtype']} {data}"
                    else:
                        what = f"B={r['B']} {r['dtype']}"
                    lab = f"{meta['device_type']} {r['provider']} {what}"
                    series[lab].append((x, r["speedup"]))
        for lab, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(OP_TITLE[op], fontsize=9)
        ax.set_xlabel(OP_X[op])
        ax.set_ylabel("speedup over eager")
        if series:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "pending", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(runs):
    parts = ["# Benchmark results", "",
             "Latest numbers of `pytest benchmarks/ --benchmark-only`, written by benchmarks/report.py "
             "(do not edit by hand). Plot: speedup.png.", ""]
    for dev, name in (("cpu", "CPU"), ("cuda", "GPU")):
        mine = [(m, r) for m, r in runs if m["device_type"] == dev]
        parts.append(f"## {name}\n")
        if not mine:
            parts.append(f"Pending: no {name} run recorded yet"
                         + (" (no GPU was lent to the benchmark task; run benchmarks/run_gpu.sh)." if dev == "cuda"
                            else " (the dev machine was shared by busy engineers; run the command below on a "
                                 "quiet machine).") + "\n")
        for meta, rows in mine:
            parts += [header(meta), ""]
            parts += [op_table(rows, op) for op in TABLE_OPS if op_table(rows, op)]
    parts += ["## Performance targets\n", targets_table(runs),
              "### Against the peers (FAISS, PyTorch's linear_cross_entropy)\n", limit_targets_table(PEER_TARGETS, runs),
              "### Shared against per-sample negatives (same run)\n", cross_targets_table(runs),
              "### Against the machine's limit (square-GEMM rate, embedding_bag gather)\n",
              limit_targets_table(LIMIT_TARGETS, runs),
              "## Backend choice for `auto` on CUDA (instdisc_kernels/_backend.py CUDA_PREFERENCE)\n",
              auto_choice(runs), "", HOW_TO]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files (--benchmark-json)")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "RESULTS.md"))
    ap.add_argument("--plot", default=os.path.join(here, "speedup.png"), help="'' to skip the plot")
    a = ap.parse_args(argv)
    runs = [load(p) for p in a.json]
    with open(a.out, "w") as f:
        f.write(render(runs))
    if a.plot:
        plot(runs, a.plot)
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
