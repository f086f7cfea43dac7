"""Test helper: the flags of a tiny instdisc-train run on digits and the reader of its
metrics.jsonl."""
import json
import os

TINY_DIGITS = ["--limit-train", "96", "--limit-test", "40", "--batch-size", "32", "--no-progress"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
