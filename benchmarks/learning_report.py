"""Regenerate the learning-quality table and plots of docs/learning.md.

    python benchmarks/learning_report.py                      # everything (digits + mnist5k, 3 seeds)
    python benchmarks/learning_report.py --datasets digits --rows softmax "NCE, Z batch"

Each (dataset, row, seed) is one ``instdisc-train`` run with that dataset's defaults
plus the row's flags, in its own process, into ``--runs/<dataset>/<row>/seed<s>``; a run
whose final.json exists is reused (delete the folder to redo it). Each finished run also
leaves a small summary (final metrics, per-epoch history, baselines, wall time, command)
in ``--summaries/<dataset>/<row>/seed<s>.json``, which is committed: the run folders
(checkpoints, logs) are not, and the tables are rebuilt from the summaries. Then it writes
``--results`` (the markdown tables: mean +- standard deviation over the seeds) and
``--plot`` (bank kNN top-1 per epoch, mean over the seeds, per Z policy and per lambda).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (row name, trainer flags). Every NCE row uses K = 1024 (the per-dataset default).
Z_ROWS = [
    ("NCE, Z first-batch (lemniscate)", ["--loss", "nce", "--z", "first-batch"]),
    ("NCE, Z ema 0.99", ["--loss", "nce", "--z", "ema", "--z-ema", "0.99"]),
    ("NCE, Z ema 0.9", ["--loss", "nce", "--z", "ema", "--z-ema", "0.9"]),
    ("NCE, Z ema-bc 0.99", ["--loss", "nce", "--z", "ema-bc", "--z-ema", "0.99"]),
    ("NCE, Z exact every 10", ["--loss", "nce", "--z", "exact", "--z-every", "10"]),
    ("NCE, Z exact every 1", ["--loss", "nce", "--z", "exact", "--z-every", "1"]),
    ("NCE, Z batch", ["--loss", "nce", "--z", "batch"]),
]
LAMBDA_ROWS = [(f"NCE, Z batch, lambda {lam}", ["--loss", "nce", "--z", "batch", "--proximal", str(lam)])
               for lam in (10, 30, 50)]
SHARED_ROWS = [("NCE, Z batch, shared negatives", ["--loss", "nce", "--z", "batch", "--negatives", "shared"])]
ROWS = ([("exact softmax", ["--loss", "softmax"])] + Z_ROWS + [("InfoNCE over K+1", ["--loss", "infonce"])]
        + LAMBDA_ROWS + SHARED_ROWS)
BASELINE_ROW = "exact softmax"      # its runs also evaluate raw pixels and the untrained network


def slug(name):
    return "".join(c if c.isalnum() or c == "." else "-" for c in name.lower()).strip("-")


def run_one(python, dataset, row, flags, seed, runs, log):
    out = os.path.join(runs, dataset, slug(row), f"seed{seed}")
    if os.path.exists(os.path.join(out, "final.json")):
        return out
    cmd = [python, "-m", "instdisc_kernels.train", "--dataset", dataset, "--seed", str(seed), "--out", out,
           "--no-progress", "--baselines" if row == BASELINE_ROW else "--no-baselines", *flags]
    t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.log"), "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)   # less sensitive to other load than wall
    print(f"{dataset:8s} {row:34s} seed {seed}: rc {p.returncode}, {wall:.0f} s", file=log, flush=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)} (see {out}/stdout.log)")
    with open(os.path.join(out, "wall.json"), "w") as f:
        json.dump({"seconds": wall, "cpu_seconds": cpu, "cmd": cmd[1:]}, f)
    return out


def summary_path(summaries, dataset, row, seed):
    return os.path.join(summaries, dataset, slug(row), f"seed{seed}.json")


def write_summary(out, path):
    """The committed record of one finished run (what the tables and plot need)."""
    run = load_run(out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**run, "commit": commit.stdout.strip() or None}, f, indent=1, allow_nan=True)
        f.write("\n")


def load_summary(path):
    with open(path) as f:
        return json.load(f)


def load_run(out):
    import torch

    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    wall = {"seconds": float("nan"), "cpu_seconds": float("nan"), "cmd": None}   # (missing if stopped after final.json)
    if os.path.exists(os.path.join(out, "wall.json")):
        with open(os.path.join(out, "wall.json")) as f:
            wall.update(json.load(f))
    return {"final": final, "history": history, "baselines": ck.get("baselines", {}), "seconds": wall["seconds"],
            "cpu_seconds": wall["cpu_seconds"], "cmd": wall["cmd"]}


def _ms(values):
    """mean ± sample standard deviation (the value alone for one seed)."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def _cpu(rs):
    """Mean CPU seconds (user + system of the run's process) over the runs that recorded it."""
    v = [r.get("cpu_seconds", float("nan")) for r in rs]
    v = [x for x in v if x == x]
    return f"{np.mean(v):.0f}" if v else ""


def table(dataset, results):
    lines = [f"### {dataset} (mean ± standard deviation over the seeds)", "",
             "| features | seeds | kNN top-1 (recomputed) | kNN top-1 (bank) | linear probe | final Z | s / run | CPU s / run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = results.get(BASELINE_ROW, [])
    for name in ("raw pixels", "random network"):
        rs = [r["baselines"][name] for r in base if name in r["baselines"]]
        if rs:
            label = "raw pixels" if name == "raw pixels" else "untrained network"
            lines.append(f"| {label} | {len(rs)} | {_ms([r['knn_top1'] for r in rs])} | | "
                         f"{_ms([r['linear'] for r in rs])} | | | |")
    for row, _ in ROWS:
        rs = results.get(row)
        if not rs:
            continue
        zs = [r["history"][-1].get("z") for r in rs]
        z = f"{np.mean(zs):.3g}" if all(v is not None for v in zs) else ""
        lines.append(f"| {row} | {len(rs)} | {_ms([r['final']['knn_top1'] for r in rs])} | "
                     f"{_ms([r['final']['bank_top1'] for r in rs])} | {_ms([r['final']['linear'] for r in rs])} | "
                     f"{z} | {np.nanmean([r['seconds'] for r in rs]):.0f} | {_cpu(rs)} |")
    return "\n".join(lines)


def _curve(ax, rs, key, label, color):
    curves = np.array([[h.get(key, np.nan) for h in r["history"]] for r in rs], dtype=float)
    x = np.arange(1, curves.shape[1] + 1)
    ax.plot(x, np.nanmean(curves, 0), label=label, color=color)
    if len(rs) > 1:
        ax.fill_between(x, np.nanmin(curves, 0), np.nanmax(curves, 0), alpha=0.15, color=color)


def plot(all_results, path):
    """Per dataset: bank kNN top-1 per Z policy, the Z each policy used (last step of each
    epoch, log scale), and bank kNN top-1 per proximal lambda; mean over the seeds, band = min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(all_results)
    fig, axes = plt.subplots(len(datasets), 3, figsize=(17, 4.2 * len(datasets)), squeeze=False)
    z_rows, names = [r for r, _ in Z_ROWS], [r for r, _ in ROWS]
    panels = [("bank kNN top-1 per Z policy", [BASELINE_ROW] + z_rows, "knn_top1", "kNN top-1 (%)"),
              ("Z used (end of each epoch)", z_rows, "z", "Z"),
              ("bank kNN top-1 per proximal lambda (NCE, Z batch)", ["NCE, Z batch"] + [r for r, _ in LAMBDA_ROWS],
               "knn_top1", "kNN top-1 (%)")]
    for i, ds in enumerate(datasets):
        for j, (title, rows, key, ylabel) in enumerate(panels):
            ax = axes[i][j]
            for row in rows:
                if all_results[ds].get(row):
                    label = row.replace("NCE, Z batch, ", "") if j == 2 else row
                    color = plt.cm.tab10(names.index(row) % 10)                  # one colour per row
                    _curve(ax, all_results[ds][row], key, "lambda 0" if j == 2 and row == "NCE, Z batch" else label,
                           color)
            if key == "z":
                ax.set_yscale("log")
            ax.set_title(f"{ds}: {title}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=[r for r, _ in ROWS], help="row names (default: all)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "learning"), help="run folders")
    p.add_argument("--summaries", default=os.path.join(HERE, "learning_runs"),
                   help="committed per-run summaries (rebuilt from --runs when a run folder is there)")
    p.add_argument("--results", default=os.path.join(ROOT, "docs", "learning_results.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "learning_curves.png"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--collect-only", action="store_true", help="only tabulate the runs already there")
    args = p.parse_args(argv)
    unknown = set(args.rows) - {r for r, _ in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; rows: {[r for r, _ in ROWS]}")
    flags = dict(ROWS)
    rows = [r for r, _ in ROWS if r in args.rows]
    if not args.collect_only:
        for ds in args.datasets:              # seed-major: an interrupted study still has whole rows
            for seed in args.seeds:
                for row in rows:
                    path = summary_path(args.summaries, ds, row, seed)
                    if not os.path.exists(path):      # else done in an earlier session (its run folder may be gone)
                        write_summary(run_one(args.python, ds, row, flags[row], seed, args.runs, sys.stderr), path)
    all_results = {}
    for ds in args.datasets:
        all_results[ds] = {}
        for row in rows:
            done = []
            for seed in args.seeds:
                out, path = os.path.join(args.runs, ds, slug(row), f"seed{seed}"), summary_path(args.summaries, ds, row, seed)
                if os.path.exists(os.path.join(out, "final.json")) and not os.path.exists(path):
                    write_summary(out, path)
                if os.path.exists(path):
                    done.append(load_summary(path))
            if done:
                all_results[ds][row] = done
    text = ["<!-- generated by benchmarks/learning_report.py; do not edit by hand -->", ""]
    text += [table(ds, all_results[ds]) + "\n" for ds in args.datasets]
    with open(args.results, "w") as f:
        f.write("\n".join(text))
    plot(all_results, args.plot)
    print("\n".join(text))
    print(f"wrote {args.results} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
