"""``instdisc-train``: the reference InstDisc trainer (``python -m instdisc_kernels.train``).

With no arguments it trains a small CNN on scikit-learn's bundled 8x8 digits
(nothing downloaded) in about a minute on a laptop CPU, then compares the kNN
accuracy of the learned features with the same network at initialisation and
with raw pixels. See ``--help`` for every flag and the per-dataset defaults.

Modules: ``cli`` (the flags and ``main``), ``config`` (per-dataset defaults and the checks of
the flags), ``components`` (process group, loss module, output folder), ``loop`` (the run and
its epochs), ``resume`` (checkpoint compatibility and restore), ``report`` (kNN, linear probe,
baselines, metrics files, plots, summary). The names below are re-exported for callers of the
former single-module ``instdisc_kernels.train``; to monkeypatch one, patch the module that uses it
(e.g. ``instdisc_kernels.train.loop.save_checkpoint``).
"""
from .cli import build_parser, main, parse_args
from .components import build_criterion, init_distributed, prepare_out
from .config import BANK_DTYPES, DEFAULTS, ConfigError, TrainingError, check_args, fill_defaults, parse_z
from .loop import run, train_one_epoch
from .report import bank_features, knn_eval, linear_probe

__all__ = [
    "main", "build_parser", "parse_args", "run", "train_one_epoch", "build_criterion", "init_distributed",
    "prepare_out", "DEFAULTS", "BANK_DTYPES", "ConfigError", "TrainingError", "check_args", "fill_defaults", "parse_z",
    "bank_features", "knn_eval", "linear_probe",
]
