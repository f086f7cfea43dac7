"""``DistributedInstDiscLoss``: InstDisc with a replicated or a sharded memory bank.

Gradient convention (both modes). ``forward`` takes the local batch and returns
the loss of the *global* batch (every rank's rows, in rank order), the same
value on every rank, equal to the single-process loss for the same global
index matrix. Its gradient with respect to the local features is
``world_size * d(global loss)/d(features)``: DDP averages parameter gradients
over ranks, so the averaged update equals single-process training on the
global batch. (With equal local batches this is the gradient of the local-mean
loss, the usual DDP convention.) No collective runs in backward.
"""
from __future__ import annotations

import math
import struct

import torch
from torch import nn

from .. import _backend, _validate
from .._backend import BACKENDS
from ..memory_bank import MemoryBank, uniform_init
from ..ops import knn as _knn
from ..ops._formulas import opmath
from ..ops.bank_update import backend_after_loss, bank_update_
from ..ops.nce import draw_negatives, nce_loss
from ..ops.nce_shared import draw_shared_negatives, shared_entries
from ..ops.softmax import nonparametric_softmax_loss
from . import _comm, _sharded

MODES = ("replicated", "sharded")
INIT_BLOCK = 1 << 16           # rows per independently seeded init block (world-size independent init)


class _GlobalLoss(torch.autograd.Function):
    """Returns a precomputed loss value; backward returns grad_out * scale * grad."""

    @staticmethod
    def forward(ctx, features, loss, grad, scale):
        ctx.save_for_backward(grad)
        ctx.scale, ctx.dtype = scale, features.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out.to(grad.dtype) * ctx.scale * grad).to(ctx.dtype), None, None, None


def _block_init(lo, hi, dim, seed, dtype, device):
    """Rows [lo, hi) of lemniscate's uniform init, block b seeded with seed + b:
    the same bank whatever the world size."""
    out = torch.empty(hi - lo, dim, dtype=dtype, device=device)
    for b in range(lo // INIT_BLOCK, -(-hi // INIT_BLOCK)):
        a = b * INIT_BLOCK
        g = torch.Generator(device=device).manual_seed(seed + b)
        rows = uniform_init(min(INIT_BLOCK, hi - a), dim, generator=g, dtype=dtype, device=device)
        s, e = max(a, lo), min(a + rows.shape[0], hi)
        out[s - lo:e - lo] = rows[s - a:e - a]
    return out


def _check_config(mode, num_samples, dim, num_negatives, temperature, momentum, z, z_ema, proximal, loss_type,
                  backend, bank_dtype, world_size):
    """Local argument checks; returns the initial Z state (-1: estimate it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'replicated' or 'sharded', got {mode!r}")
    z_init = _validate.check_loss_config(
        num_samples=num_samples, dim=dim, num_negatives=num_negatives, temperature=temperature,
        momentum=momentum, z=z, z_ema=z_ema, proximal=proximal, loss_type=loss_type, backend=backend,
        bank_dtype=bank_dtype)
    if mode == "sharded" and num_samples < world_size:
        raise ValueError(f"num_samples={num_samples} is smaller than the world size {world_size}: "
                         f"a shard would be empty")
    return z_init


# Constructor arguments that must be equal on every rank: (name, kind); kind is float, int, bool or
# the tuple of allowed values (encoded as the position). One all_gather of the int64 encodings at
# construction compares them all.
_Z_MODES = ("first-batch", "ema", "fixed")
_FINGERPRINT = (("mode", MODES), ("num_samples", int), ("dim", int), ("num_negatives", int),
                ("temperature", float), ("momentum", float), ("z", _Z_MODES), ("z value", float),
                ("z_ema", float), ("proximal", float), ("loss_type", ("nce", "infonce")),
                ("backend", BACKENDS), ("bank_dtype", _validate.FLOAT_DTYPES), ("validate", bool))


_STEP_SCHEMA = (("features dtype", _validate.FLOAT_DTYPES),)
_KNN_SCHEMA = (("queries dtype", _validate.FLOAT_DTYPES), ("k", int), ("temperature", float),
               ("num_classes (-1: None)", int), ("batch_size", int))


def _fingerprint(mode, num_samples, dim, num_negatives, temperature, momentum, z, z_ema, proximal, loss_type,
                 backend, bank_dtype, validate):
    """The int64 encoding of the (already validated) arguments, in _FINGERPRINT order."""
    z_mode = z if isinstance(z, str) else "fixed"
    values = (mode, num_samples, dim, num_negatives, temperature, momentum, z_mode,
              float(z) if z_mode == "fixed" else -1.0, z_ema, proximal, loss_type, backend, bank_dtype, validate)
    return [_encode(v, kind) for v, (_, kind) in zip(values, _FINGERPRINT)]


def _encode(v, kind):
    if kind is float:
        return struct.unpack("<q", struct.pack("<d", float(v)))[0]
    if isinstance(kind, tuple):
        return kind.index(v)
    return int(v)


def _decode(code, kind):
    if kind is float:
        return struct.unpack("<d", struct.pack("<q", code))[0]
    if isinstance(kind, tuple):
        return kind[code]
    return kind(code)


def check_same_on_every_rank(table, schema, hint):
    """ValueError naming each column of ``table`` (a (world, len(schema)) int64 table from
    _comm.agree) whose value differs across ranks. Every rank holds the same table, so every
    rank raises the same error."""
    diffs = []
    for j, (name, kind) in enumerate(schema):
        col = table[:, j].tolist()
        if len(set(col)) > 1:
            per_rank = ", ".join(f"rank {r}: {_decode(c, kind)}" for r, c in enumerate(col))
            diffs.append(f"{name} differs across ranks ({per_rank})")
    if diffs:
        raise ValueError("; ".join(diffs) + f": {hint}")


class DistributedInstDiscLoss(nn.Module):
    """InstDisc loss (NCE, InfoNCE or exact softmax) whose bank spans a process group.

    mode="replicated": every rank holds the whole N x D bank; rank 0's initial
    bank and Z are broadcast; each step every rank applies the update of the
    whole global batch in rank order (identical banks; the last occurrence of a
    repeated index wins). Negatives are drawn per rank; with negatives="shared"
    every rank draws the same K shared rows each step from ``shared_generator``
    (seeded from rank 0's broadcast seed), so the global batch shares one
    negative set (ops/nce_shared.py; explicit neg_indices are not accepted then).
    Sharded, each shard scores the global batch against its own share of the K
    rows as entries of the sharded NCE (Z and the InfoNCE log-sum-exp combined
    by all_reduce, like the exact softmax), not as the fused GEMM kernel.
    mode="sharded": rank r holds rows [N*r//W, N*(r+1)//W); no rank holds the
    bank. Communication per step is O(B_global * D): features and indices are
    all_gathered, per-shard negative counts exchanged (all_to_all, B_global
    ints), partial gradients reduce-scattered; bank rows never move.

    generator: draws the negatives of this rank. When None, each rank gets its
    own generator seeded from rank 0's default RNG plus the rank (decorrelated
    negatives, reproducible under torch.manual_seed). The initial bank comes
    from a seed drawn on rank 0 (from ``generator`` if given).
    All collective tensors live on ``device``: use CUDA with NCCL.
    """

    def __init__(self, num_samples, dim=128, *, mode="replicated", num_negatives=4096, temperature=0.07,
                 momentum=0.5, z="first-batch", z_ema=0.99, proximal=0.0, bank_dtype=torch.float32,
                 loss_type="nce", backend="auto", device=None, group=None, generator=None, validate=True,
                 negatives="per-sample"):
        super().__init__()
        import torch.distributed as dist
        if negatives not in ("per-sample", "shared"):
            raise ValueError(f"negatives must be 'per-sample' or 'shared', got {negatives!r}")
        self.negatives = negatives
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedInstDiscLoss needs torch.distributed.init_process_group() first")
        self.group = group
        self.rank, self.world_size = _comm.rank_and_size(group)
        self.device = torch.device("cpu")
        err, z_init, cfg = None, -1.0, [0] * len(_FINGERPRINT)
        try:        # local checks, then every rank agrees: a bad or different config fails all ranks
            backend = _backend.canonical(backend)   # "reference" -> "eager" (DeprecationWarning)
            z_init = _check_config(mode, num_samples, dim, num_negatives, temperature, momentum, z, z_ema,
                                   proximal, loss_type, backend, bank_dtype, self.world_size)
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            cfg = _fingerprint(mode, num_samples, dim, num_negatives, temperature, momentum, z, z_ema, proximal,
                               loss_type, backend, bank_dtype, validate)
        except (TypeError, ValueError, RuntimeError) as e:
            err = e
        check_same_on_every_rank(_comm.agree(err, cfg, group=group, device=self.device), _FINGERPRINT,
                                 "every rank must build DistributedInstDiscLoss with the same arguments")
        W, N = self.world_size, num_samples
        self.mode, self.num_samples, self.dim = mode, N, dim
        self.num_negatives, self.temperature = num_negatives, float(temperature)
        self.z_mode = z if isinstance(z, str) else "fixed"
        self.z_ema, self.proximal = float(z_ema), float(proximal)
        self.loss_type, self.backend, self.validate = loss_type, backend, validate

        seed = torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu").to(self.device)
        dist.broadcast(seed, src=_comm.global_rank(group, 0), group=group)
        seed = int(seed)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed((seed + 1 + self.rank) % 2**62)
        self.generator = generator
        # negatives="shared": the same K rows on every rank, from one generator seeded alike everywhere
        self.shared_generator = torch.Generator(device=self.device).manual_seed((seed + 1 + self.world_size) % 2**62)

        self.bounds = [N * r // W for r in range(W + 1)] if mode == "sharded" else [0, N]
        self.shard_range = (self.bounds[self.rank], self.bounds[self.rank + 1]) if mode == "sharded" else (0, N)
        lo, hi = self.shard_range
        self.bank = MemoryBank(hi - lo, dim, dtype=bank_dtype, device=self.device, momentum=momentum, init="zeros")
        if mode == "sharded" or self.rank == 0:
            self.bank.memory.copy_(_block_init(lo, hi, dim, seed, bank_dtype, self.device))
        self.register_buffer("z", torch.tensor([z_init], dtype=torch.float32, device=self.device))
        if mode == "replicated":
            dist.broadcast(self.bank.memory, src=_comm.global_rank(group, 0), group=group)
            dist.broadcast(self.z, src=_comm.global_rank(group, 0), group=group)
        self._inner_bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ #
    @property
    def memory(self):
        """This rank's bank rows: the whole bank (replicated) or rows shard_range (sharded)."""
        return self.bank.memory

    def _check_batch(self, features, indices, neg_indices):
        _validate.check_float_matrix("features", features, dim=self.dim)
        _validate.check_same_device(features=features, memory=self.memory, indices=indices)
        _validate.check_index_vector("indices", indices, features.shape[0], self.num_samples, values=self.validate)
        if self.validate:
            _validate.check_finite("features", features)
        if neg_indices is None:
            return -1
        if self.num_negatives == 0:
            raise ValueError("neg_indices given but num_negatives=0 (exact softmax uses every bank row)")
        _validate.check_tensor("neg_indices", neg_indices)
        if neg_indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"neg_indices must be an integer (int64) tensor, got {neg_indices.dtype}")
        if neg_indices.dim() != 2 or neg_indices.shape[0] != features.shape[0] or neg_indices.shape[1] < 1:
            raise ValueError(f"neg_indices must have shape (B={features.shape[0]}, K>=1), "
                             f"got {tuple(neg_indices.shape)}")
        _validate.check_same_device(features=features, neg_indices=neg_indices)
        if self.validate:
            _validate.check_index_range("neg_indices", neg_indices, self.num_samples)
        return neg_indices.shape[1]

    def forward(self, features, indices, neg_indices=None):
        """Loss of the global batch (see the module docstring for its gradient); updates the bank.

        features (B, D) and indices (B,) are this rank's batch (B may differ by rank).
        neg_indices: optional explicit (B, K) global negative rows of the local batch
        (tests); given on every rank or on none.
        """
        err, batch, k_given, dtype = None, 0, -1, 0
        try:
            k_given = self._check_batch(features, indices, neg_indices)
            batch, dtype = features.shape[0], _encode(features.dtype, _validate.FLOAT_DTYPES)
        except (TypeError, ValueError) as e:
            err = e
        need = int(isinstance(features, torch.Tensor) and features.requires_grad and torch.is_grad_enabled())
        table = _comm.agree(err, [batch, need, k_given, dtype], group=self.group, device=self.device)
        check_same_on_every_rank(table[:, 3:], _STEP_SCHEMA, "every rank must pass features of the same dtype "
                                 "(the gathered batch and the bank update need one dtype)")
        sizes, any_grad, ks = table[:, 0].tolist(), bool(table[:, 1].any()), table[:, 2].tolist()
        if len(set(ks)) > 1:
            raise ValueError(f"neg_indices must be given on every rank or on none, with the same K; "
                             f"K per rank: {ks} (-1: not given)")
        indices = indices.long()
        if self.mode == "replicated":
            return self._forward_replicated(features, indices, neg_indices, sizes)
        return self._forward_sharded(features, indices, neg_indices, sizes, any_grad)

    # ------------------------------------------------------------------ #
    def _replicated_z(self, features, indices, neg_indices):
        """Z for this step, agreed by all ranks (all_reduce of sum exp(s/T) and the count)."""
        z = float(self.z)
        if self.loss_type == "infonce" or not (z <= 0 or self.z_mode == "ema"):
            return z, neg_indices
        if neg_indices is None:
            neg_indices = draw_negatives(indices, self.num_samples, self.num_negatives, generator=self.generator)
        neg = neg_indices.long()
        idx = torch.cat([indices.view(-1, 1), neg.expand(indices.shape[0], -1) if neg.dim() == 1 else neg], 1)
        acc = opmath(features.dtype)
        rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
        s = _sharded.entry_scores(features.detach().to(acc), self.memory, rows, idx.reshape(-1))
        # in log space, like the single-process kernels: the max of s/T over all ranks first, so
        # exp(s/T) cannot overflow (T = 0.01 with aligned features is exp(100))
        x = s.to(torch.float64) / self.temperature
        m = x.max().reshape(1)
        _comm.all_reduce_(m, "max", self.group)
        tot = torch.stack([torch.exp(x - m).sum(), torch.tensor(float(s.numel()), dtype=torch.float64, device=s.device)])
        _comm.all_reduce_(tot, "sum", self.group)
        log_z = math.log(self.num_samples) + float(m) + math.log(float(tot[0]) / float(tot[1]))
        if z > 0:   # moving average as a log-add-exp
            a, b = math.log(self.z_ema * z), math.log1p(-self.z_ema) + log_z
            log_z = max(a, b) + math.log1p(math.exp(-abs(a - b)))
        z = math.exp(log_z) if log_z < 709 else math.inf
        z32 = float(torch.tensor(z, dtype=torch.float32))       # what the Z buffer would hold
        if not (math.isfinite(z32) and z32 > 0):
            # every rank computed the same value from the same all_reduce: every rank raises
            raise ValueError(f"the NCE normaliser Z = exp({log_z:.1f}) is not representable in float32: "
                             f"temperature={self.temperature} is too small for these features (or the "
                             f"features are not unit length); the bank and Z are left unchanged")
        self.z.fill_(z)
        return z, neg_indices

    def _forward_replicated(self, features, indices, neg_indices, sizes):
        B, Bg = features.shape[0], sum(sizes)
        mem = self.memory
        if self.num_negatives == 0:
            local = nonparametric_softmax_loss(features, mem, indices, temperature=self.temperature,
                                               momentum=self.bank.momentum, update_memory=False,
                                               validate=False, backend=self.backend, proximal=self.proximal)
        else:
            if self.negatives == "shared" and neg_indices is None:
                neg_indices = draw_shared_negatives(indices, self.num_samples, self.num_negatives,
                                                    generator=self.shared_generator)
            z, neg_indices = self._replicated_z(features, indices, neg_indices)
            local = nce_loss(features, mem, indices, num_negatives=self.num_negatives,
                             temperature=self.temperature, z=z, momentum=self.bank.momentum,
                             proximal=self.proximal, neg_indices=neg_indices, update_memory=False,
                             generator=self.generator, loss_type=self.loss_type, validate=False,
                             backend=self.backend, negatives=self.negatives)
        total = (local.detach().to(torch.float64) * B).reshape(1)
        _comm.all_reduce_(total, "sum", self.group)
        scale = self.world_size * B / Bg
        # value: the agreed global mean, bit-identical on every rank (x - x is exactly 0, whereas
        # a + (c - a) need not round to c); gradient: this rank's share, scaled
        part = local * scale
        loss = (total[0] / Bg).to(local.dtype) + (part - part.detach())
        Fg = _comm.all_gather_rows(features.detach(), sizes, self.group)
        yg = _comm.all_gather_rows(indices, sizes, self.group)
        bank_update_(mem, yg, Fg, self.bank.momentum, backend=backend_after_loss(self.backend, mem.device),
                     validate=False)
        return loss

    def _forward_sharded(self, features, indices, neg_indices, sizes, any_grad):
        lo, hi = self.shard_range
        mem, W = self.memory, self.world_size
        Fg_raw = _comm.all_gather_rows(features.detach(), sizes, self.group)
        yg = _comm.all_gather_rows(indices, sizes, self.group)
        F = Fg_raw.to(opmath(features.dtype))
        if self.num_negatives == 0:
            loss, grad = _sharded.exact_softmax(F, yg, mem, lo, temperature=self.temperature,
                                                need_grad=any_grad, group=self.group, proximal=self.proximal)
        else:
            if self.negatives == "shared" and neg_indices is None:
                K = self.num_negatives
                rows, cols = shared_entries(draw_shared_negatives(yg, self.num_samples, K,
                                                                  generator=self.shared_generator), F.shape[0], lo, hi)
            elif neg_indices is not None:
                neg_g = _comm.all_gather_rows(neg_indices.long(), sizes, self.group)
                rows, cols = _sharded.negatives_from_matrix(neg_g, lo, hi)
                K = neg_indices.shape[1]
            else:
                K = self.num_negatives
                send = _sharded.shard_counts(features.shape[0], K, self.num_samples, self._inner_bounds,
                                             self.generator)
                counts = _comm.all_to_all_rows(send.view(-1), [features.shape[0]] * W, sizes, self.group)
                rows, cols = _sharded.negatives_from_counts(counts, hi - lo, self.generator)
            z_ema = self.z_ema if self.z_mode == "ema" else None
            loss, grad, z_used = _sharded.nce(
                F, yg, mem, lo, rows, cols, num_samples=self.num_samples, num_negatives=K,
                temperature=self.temperature, z=float(self.z), z_ema=z_ema, loss_type=self.loss_type,
                proximal=self.proximal, need_grad=any_grad, group=self.group)
            if z_used is not None:
                self.z.fill_(float(z_used))
        grad_local = _comm.reduce_scatter_rows(grad, sizes, self.rank, self.group) if any_grad else None
        own = ((yg >= lo) & (yg < hi)).nonzero().squeeze(1)
        if own.numel():
            bank_update_(mem, yg[own] - lo, Fg_raw[own], self.bank.momentum,
                         backend=backend_after_loss(self.backend, mem.device), validate=False)
        if grad_local is None or not features.requires_grad:
            return loss
        return _GlobalLoss.apply(features, loss, grad_local, float(W))

    # ------------------------------------------------------------------ #
    def knn_accuracy(self, queries, query_labels, bank_labels, *, k=200, temperature=None, num_classes=None,
                     batch_size=1024):
        """(top-1, top-5) weighted-kNN accuracy (docs/method.md) in percent of all ranks' queries,
        against the bank; the same result on every rank.

        queries (Q_r, D) / query_labels (Q_r,) are this rank's (Q_r may be 0);
        bank_labels (N,) are the labels of all N bank rows, on every rank.
        Sharded: queries are all_gathered in rounds of batch_size per rank, each
        shard computes its top k, and the owners merge the W lists."""
        T = self.temperature if temperature is None else temperature
        err, q, qmax, same = None, 0, -1, [0] * len(_KNN_SCHEMA)
        try:
            self._check_knn(queries, query_labels, bank_labels, k, T, num_classes, batch_size)
            q = queries.shape[0]
            qmax = int(query_labels.max()) if q else -1
            same = [_encode(v, kind) for v, (_, kind) in
                    zip((queries.dtype, k, T, -1 if num_classes is None else num_classes, batch_size), _KNN_SCHEMA)]
        except (TypeError, ValueError) as e:
            err = e
        table = _comm.agree(err, [q, qmax, *same], group=self.group, device=self.device)
        check_same_on_every_rank(table[:, 2:], _KNN_SCHEMA, "every rank must call knn_accuracy with the same "
                                 "arguments and queries of the same dtype")
        qsizes = table[:, 0].tolist()
        if sum(qsizes) == 0:
            raise ValueError("knn_accuracy: no queries on any rank")
        if num_classes is None:
            num_classes = max(int(bank_labels.max()), int(table[:, 1].max())) + 1
        bank_labels = bank_labels.long()
        hits = torch.zeros(2, dtype=torch.float64, device=self.device)
        rounds = -(-max(qsizes) // batch_size)
        for i in range(rounds):
            a = i * batch_size
            qb, lab = queries[a:a + batch_size], query_labels[a:a + batch_size].long()
            if self.mode == "replicated":
                if qb.shape[0] == 0:
                    continue
                vals, idx = _knn.search(qb, self.memory, k)
            else:
                sub = [max(0, min(batch_size, s - a)) for s in qsizes]
                qg = _comm.all_gather_rows(qb, sub, self.group)
                vals, idx = _sharded.topk_padded(qg, self.memory, self.shard_range[0], k)
                recv = [sub[self.rank]] * self.world_size
                vals = _comm.all_to_all_rows(vals, sub, recv, self.group)
                idx = _comm.all_to_all_rows(idx, sub, recv, self.group)
                vals, idx = _sharded.merge_topk(vals, idx, self.world_size, k)
            # knn_accuracy's weights and ranking (ops/knn.py): exp((sim - best sim) / T)
            scores = _knn._scores(vals, idx, bank_labels, T, num_classes, relative=True)
            h1, h5 = _knn.topk_hits(scores, lab, num_classes)
            hits[0] += h1
            hits[1] += h5
        _comm.all_reduce_(hits, "sum", self.group)
        n = sum(qsizes)
        return 100.0 * float(hits[0]) / n, 100.0 * float(hits[1]) / n

    def _check_knn(self, queries, query_labels, bank_labels, k, T, num_classes, batch_size):
        _validate.check_tensor("queries", queries)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {tuple(queries.shape)}")
        if queries.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"queries must be a floating tensor, got {queries.dtype}")
        _knn.check_search_args(k, self.num_samples, T, num_classes)     # ops/knn.py's checks
        for name, t, n in (("query_labels", query_labels, queries.shape[0]),
                           ("bank_labels", bank_labels, self.num_samples)):
            _knn._check_labels(name, t, n, num_classes)
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"{name} contains {int(t.min())}, labels must be >= 0")
        _validate.check_same_device(queries=queries, query_labels=query_labels, bank_labels=bank_labels,
                                    memory=self.memory)
        _validate.check_positive_int(batch_size, "batch_size")
        if queries.numel():
            _validate.check_finite("queries", queries)

    def full_bank(self, *, all_ranks=False):
        """The whole N x D bank. Replicated: this rank's copy (no communication).
        Sharded: gathered on rank 0 (None on other ranks), or on every rank with
        all_ranks=True (every rank must call it; needs N*D memory where it lands)."""
        if self.mode == "replicated":
            return self.memory
        sizes = [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        if all_ranks:
            return _comm.all_gather_rows(self.memory, sizes, self.group)
        import torch.distributed as dist
        buf = self.memory.new_zeros((max(sizes), self.dim))
        buf[:sizes[self.rank]] = self.memory
        parts = [torch.empty_like(buf) for _ in sizes] if self.rank == 0 else None
        dist.gather(buf, parts, dst=_comm.global_rank(self.group, 0), group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]) if self.rank == 0 else None

    # ------------------------------------------------------------------ #
    def get_extra_state(self):
        lo, hi = self.shard_range
        return {"mode": self.mode, "num_samples": self.num_samples, "dim": self.dim,
                "world_size": self.world_size, "rank": self.rank, "rows": [lo, hi]}

    def set_extra_state(self, state):
        self._check_extra_state(state)

    def _check_extra_state(self, state):
        lo, hi = self.shard_range
        if not isinstance(state, dict) or "rows" not in state:
            raise ValueError("state_dict has no shard metadata: not a DistributedInstDiscLoss state")
        if state.get("num_samples") != self.num_samples or list(state["rows"]) != [lo, hi]:
            raise ValueError(
                f"state_dict holds rows {list(state['rows'])} of a {state.get('num_samples')}-row bank "
                f"(saved by rank {state.get('rank')} of {state.get('world_size')}, mode {state.get('mode')}); "
                f"this rank holds rows [{lo}, {hi}) of {self.num_samples}: use "
                f"instdisc_kernels.distributed.load_resharded to change the world size")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        if key in state_dict:        # check the shard before any buffer is copied
            self._check_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        k = "exact softmax" if self.num_negatives == 0 else f"num_negatives={self.num_negatives}"
        return (f"mode={self.mode}, rows={list(self.shard_range)} of {self.num_samples}, world_size="
                f"{self.world_size}, {k}, temperature={self.temperature}, z={self.z_mode}, "
                f"loss_type={self.loss_type}")

