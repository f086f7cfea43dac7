"""instdisc_kernels: fused kernels for non-parametric instance discrimination (InstDisc / NPID).

Public API::

    nce_loss, nonparametric_softmax_loss, bank_update_, knn_predict, knn_accuracy, knn_search, evaluate_knn,
    MemoryBank, InstDiscLoss, NCEAverage, NCECriterion, LinearAverage
"""
from . import _backend, reference  # noqa: F401
from .evaluate import evaluate_knn
from .lemniscate import LinearAverage, NCEAverage, NCECriterion
from .memory_bank import MemoryBank
from .modules import InstDiscLoss
from .ops.bank_update import bank_update_
from .ops.knn import knn_accuracy, knn_predict
from .ops.knn_search import knn_search
from .ops.nce import nce_loss
from .ops.softmax import nonparametric_softmax_loss

__version__ = "0.1.0"

__all__ = [
    "nce_loss", "nonparametric_softmax_loss", "bank_update_", "knn_predict", "knn_accuracy", "knn_search", "evaluate_knn",
    "MemoryBank", "InstDiscLoss", "NCEAverage", "NCECriterion", "LinearAverage", "reference",
]
