"""benchmarks/learning_report.py keeps a committed summary per run: the tables are rebuilt
from the summaries alone, after the run folders (checkpoints, logs) are gone."""
import importlib.util
import json
import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report():
    spec = importlib.util.spec_from_file_location("learning_report", os.path.join(ROOT, "benchmarks", "learning_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(out, seed):
    os.makedirs(out)
    final = {"knn_top1": 90.0 + seed, "bank_top1": 80.0 + seed, "linear": 95.0 + seed}
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(final, f)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for epoch in range(3):
            f.write(json.dumps({"epoch": epoch + 1, "knn_top1": 50.0 + 10 * epoch + seed, "z": 1e4 * (epoch + 1)}) + "\n")
    torch.save({"baselines": {"raw pixels": {"knn_top1": 88.0, "linear": 89.0}}}, os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "wall.json"), "w") as f:
        json.dump({"seconds": 12.0 + seed, "cmd": ["-m", "instdisc_kernels.train", "--seed", str(seed)]}, f)


def test_tables_rebuild_from_committed_summaries(tmp_path):
    rep = _report()
    runs, summaries = str(tmp_path / "runs"), str(tmp_path / "summaries")
    row = "NCE, Z batch"
    for seed in (0, 1):
        out = os.path.join(runs, "digits", rep.slug(row), f"seed{seed}")
        _fake_run(out, seed)
        rep.write_summary(out, rep.summary_path(summaries, "digits", row, seed))
    shutil.rmtree(runs)                                       # the run folders are not committed
    results, plot = str(tmp_path / "results.md"), str(tmp_path / "curves.png")
    rep.main(["--datasets", "digits", "--seeds", "0", "1", "--rows", row, "--runs", runs, "--summaries", summaries,
              "--results", results, "--plot", plot, "--collect-only"])
    text = open(results).read()
    assert f"| {row} | 2 | 90.50 ± 0.71 | 80.50 ± 0.71 | 95.50 ± 0.71 | 3e+04 | 12 |" in text
    assert os.path.getsize(plot) > 0
    s = rep.load_summary(rep.summary_path(summaries, "digits", row, 1))
    assert s["cmd"][-1] == "1" and s["baselines"]["raw pixels"]["linear"] == 89.0 and len(s["history"]) == 3
