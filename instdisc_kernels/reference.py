"""Float64 oracle: every op of docs/method.md written literally in plain PyTorch.

This module is what every kernel is tested against. It is written to read like
the spec, not to be fast: it gathers the full B x (K+1) x D tensor, builds the
full B x N logits and the full Q x N similarity matrix. Every function computes
in float64 (inputs are upcast) and returns float64 tensors, except the memory
update which writes back in the bank's own dtype.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-7  # lemniscate's NCECriterion eps


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# --------------------------------------------------------------------------- #
# Bank initialisation and negatives                                            #
# --------------------------------------------------------------------------- #
# lemniscate's init, uniform(-s, s) with s = 1/sqrt(D/3): the bank's own (memory_bank.py), used
# here to make test banks; it is data, not a formula the kernels are checked against
def init_memory(*args, **kwargs):
    """The bank's initial rows: memory_bank.uniform_init (lemniscate's U(-s, s)), the one definition.
    Imported when called, so this module also loads on its own (as a file, without the package)."""
    from .memory_bank import uniform_init
    return uniform_init(*args, **kwargs)


def index_matrix(indices: torch.Tensor, neg_indices: torch.Tensor) -> torch.Tensor:
    """idx (B x (K+1)): column 0 the positive, columns 1..K the negatives."""
    return torch.cat([indices.view(-1, 1), neg_indices], dim=1)


# --------------------------------------------------------------------------- #
# docs/method.md#noise-contrastive-estimation-nce: sampled-negative NCE                                               #
# --------------------------------------------------------------------------- #
def nce_scores(features, memory, idx):
    """s[b,k] = V[idx[b,k]] . F[b]   (B x (K+1), float64)."""
    V = _f64(memory)[idx]                       # B x (K+1) x D: the gathered tensor
    F = _f64(features)
    return torch.einsum("bkd,bd->bk", V, F)


def log_estimate_z(scores, temperature, num_samples):
    """log Z, Z = N * mean over all B*(K+1) entries of exp(s/T) (finite where Z overflows)."""
    t = _f64(scores).reshape(-1) / temperature
    return torch.logsumexp(t, 0) + math.log(num_samples / t.numel())


def estimate_z(scores, temperature, num_samples):
    """Z = N * mean over all B*(K+1) entries of exp(s/T)."""
    return torch.exp(log_estimate_z(scores, temperature, num_samples))


def ema_z(z_old, scores, temperature, num_samples, factor):
    """Z <- a*Z + (1-a)*N*mean(exp(s/T)); the first estimate when Z is unset (<= 0)."""
    est = estimate_z(scores, temperature, num_samples)
    if z_old is None or float(z_old) <= 0:
        return est
    return factor * float(z_old) + (1 - factor) * est


def nce_probs(features, memory, idx, temperature, z):
    """P[b,k] = exp(s[b,k]/T) / Z."""
    return torch.exp(nce_scores(features, memory, idx) / temperature) / z


def noise_prob(idx, num_samples, noise_probs=None):
    """Pn of every entry of idx: 1/N (lemniscate), or noise_probs[idx] for a non-uniform noise."""
    if noise_probs is None:
        return torch.tensor(1.0 / num_samples, dtype=torch.float64)
    return _f64(noise_probs)[idx]


def nce_criterion(probs, num_samples, pn=None):
    """lemniscate's NCECriterion: summed over negatives, divided by B only.

    pn: Pn per entry (B x (K+1)); None means lemniscate's uniform 1/N."""
    B, K1 = probs.shape
    K = K1 - 1
    Pn = torch.tensor(1.0 / num_samples, dtype=torch.float64) if pn is None else pn
    Pn_pos, Pn_neg = (Pn, Pn) if Pn.dim() == 0 else (Pn[:, 0], Pn[:, 1:])
    p_pos, p_neg = probs[:, 0], probs[:, 1:]
    ln_pos = torch.log(p_pos / (p_pos + K * Pn_pos + EPS))
    ln_neg = torch.log((K * Pn_neg) / (p_neg + K * Pn_neg + EPS))
    return -(ln_pos.sum() + ln_neg.sum()) / B


def nce_loss_value(features, memory, idx, temperature, z, noise_probs=None):
    """The NCE loss (docs/method.md#noise-contrastive-estimation-nce) of features against the bank rows idx, for a fixed Z."""
    N = memory.shape[0]
    return nce_criterion(nce_probs(features, memory, idx, temperature, z), N, noise_prob(idx, N, noise_probs))


def nce_grad(features, memory, idx, temperature, z, noise_probs=None):
    """dloss/dF[b] = sum_k dloss/dP[b,k] * P[b,k] / T * V[idx[b,k]] (hand-derived)."""
    coef = nce_grad_coefficients(features, memory, idx, temperature, z, noise_probs)
    return torch.einsum("bk,bkd->bd", coef, _f64(memory)[idx])


def nce_grad_coefficients(features, memory, idx, temperature, z, noise_probs=None):
    """(B, K+1) coef with dloss/dF[b] = sum_k coef[b,k] V[idx[b,k]]: dloss/dP * P / (T B)."""
    N = memory.shape[0]
    B, K1 = idx.shape
    K = K1 - 1
    c = (K * noise_prob(idx, N, noise_probs) + EPS).expand(B, K1)
    P = nce_probs(features, memory, idx, temperature, z)
    # d/dP of -log(P/(P+c)) = -c/(P(P+c));  of -log(K Pn/(P+c)) = 1/(P+c)
    dP = torch.empty_like(P)
    dP[:, 0] = -c[:, 0] / (P[:, 0] * (P[:, 0] + c[:, 0]))
    dP[:, 1:] = 1.0 / (P[:, 1:] + c[:, 1:])
    return dP * P / temperature / B


def infonce_loss_value(features, memory, idx, temperature):
    """(1/B) sum_b [ logsumexp_k(s[b,k]/T) - s[b,0]/T ]."""
    logits = nce_scores(features, memory, idx) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def infonce_grad(features, memory, idx, temperature):
    """(1/(B T)) sum_k (softmax_k(s[b]/T) - [k=0]) V[idx[b,k]]."""
    return torch.einsum("bk,bkd->bd", infonce_grad_coefficients(features, memory, idx, temperature),
                        _f64(memory)[idx])


def infonce_grad_coefficients(features, memory, idx, temperature):
    """(B, K+1) coef with dloss/dF[b] = sum_k coef[b,k] V[idx[b,k]]: (softmax - [k=0]) / (B T)."""
    B = idx.shape[0]
    logits = nce_scores(features, memory, idx) / temperature
    w = torch.softmax(logits, dim=1)
    w[:, 0] -= 1.0
    return w / (B * temperature)


def proximal_value(features, memory, indices, lam):
    """lambda * (1/B) * sum_b ||F[b] - V_old[y[b]]||^2."""
    diff = _f64(features) - _f64(memory)[indices]
    return lam * (diff * diff).sum() / features.shape[0]


def proximal_grad(features, memory, indices, lam):
    diff = _f64(features) - _f64(memory)[indices]
    return 2.0 * lam * diff / features.shape[0]


def nce_forward(features, memory, indices, neg_indices, *, temperature, z=0.0, loss_type="nce", proximal=0.0,
                z_ema=0.0, noise_probs=None):
    """What the nce_forward op computes (instdisc_kernels/ops/nce.py), in float64:
    (loss, dloss/dfeatures, Z). Z: estimated from this batch when z <= 0, the moving
    average a*z + (1-a)*estimate when z_ema = a > 0, else z; InfoNCE does not use Z."""
    idx = index_matrix(indices, neg_indices)
    Z = torch.tensor(float(z), dtype=torch.float64)
    if loss_type in ("infonce", 1):
        loss, grad = infonce_loss_value(features, memory, idx, temperature), infonce_grad(features, memory, idx, temperature)
    else:
        Z = _nce_z(features, memory, idx, temperature, z, z_ema)
        loss = nce_loss_value(features, memory, idx, temperature, Z, noise_probs)
        grad = nce_grad(features, memory, idx, temperature, Z, noise_probs)
    if proximal > 0:
        loss = loss + proximal_value(features, memory, indices, proximal)
        grad = grad + proximal_grad(features, memory, indices, proximal)
    return loss, grad, Z


def _nce_z(features, memory, idx, temperature, z, z_ema):
    """nce_forward's Z: estimated from the scores when z <= 0, the moving average when z_ema > 0, else z."""
    if z <= 0 or z_ema > 0:
        scores = nce_scores(features, memory, idx)
        return torch.as_tensor(ema_z(z if z > 0 else None, scores, temperature, memory.shape[0], z_ema))
    return torch.tensor(float(z), dtype=torch.float64)


def nce_grad_scale(features, memory, indices, neg_indices, *, temperature, z=0.0, loss_type="nce", proximal=0.0,
                   z_ema=0.0, noise_probs=None):
    """The magnitude of the terms nce_forward's gradient sums, per element: sum_k |coef[b,k]| |V[idx[b,k]]|
    (+ the proximal term's |2 lambda (F - V_y) / B|). A tolerance relative to it, not to the
    result, holds where the terms cancel (a negative equal to the positive, K = 1)."""
    idx = index_matrix(indices, neg_indices)
    if loss_type in ("infonce", 1):
        coef = infonce_grad_coefficients(features, memory, idx, temperature)
    else:
        coef = nce_grad_coefficients(features, memory, idx, temperature, _nce_z(features, memory, idx, temperature,
                                                                                  z, z_ema), noise_probs)
    scale = torch.einsum("bk,bkd->bd", coef.abs(), _f64(memory)[idx].abs())
    if proximal > 0:
        scale = scale + proximal_grad(features, memory, indices, proximal).abs()
    return scale


# --------------------------------------------------------------------------- #
# Memory update                                                                #
# --------------------------------------------------------------------------- #
def updated_rows(features, memory, indices, momentum):
    """normalize(m * V_old[y[b]] + (1-m) * F[b]) for every batch row, in float64.

    The norm is taken after dividing by max |v| (no overflow or underflow of the
    sum of squares). v = 0 (or non-finite) has no direction: the row keeps V_old[y[b]]."""
    old = _f64(memory)[indices]
    v = momentum * old + (1 - momentum) * _f64(features)
    amax = v.abs().amax(1, keepdim=True)
    ok = (amax > 0) & torch.isfinite(amax)
    u = v / torch.where(ok, amax, torch.ones_like(amax))
    u = u / u.pow(2).sum(1, keepdim=True).pow(0.5).clamp(min=1)
    return torch.where(ok, u, old)


def memory_update_(memory, indices, features, momentum):
    """In place; with a repeated index the last occurrence in batch order wins."""
    new = updated_rows(features, memory, indices, momentum)
    for b in range(indices.shape[0]):        # sequential: last occurrence wins
        memory[indices[b]] = new[b].to(memory.dtype)
    return memory


# --------------------------------------------------------------------------- #
# docs/method.md#the-exact-non-parametric-softmax: exact non-parametric softmax                                       #
# --------------------------------------------------------------------------- #
def softmax_logits(features, memory, temperature):
    return _f64(features) @ _f64(memory).t() / temperature        # B x N


def softmax_loss_value(features, memory, indices, temperature, proximal=0.0):
    """(1/B) sum_b [logsumexp_j logits[b,j] - logits[b,y[b]]], plus the proximal term when proximal > 0."""
    logits = softmax_logits(features, memory, temperature)
    picked = logits.gather(1, indices.view(-1, 1)).squeeze(1)
    loss = (torch.logsumexp(logits, dim=1) - picked).mean()
    return loss + proximal_value(features, memory, indices, proximal) if proximal > 0 else loss


def softmax_grad(features, memory, indices, temperature, proximal=0.0):
    B = features.shape[0]
    V = _f64(memory)
    p = torch.softmax(softmax_logits(features, memory, temperature), dim=1)
    grad = (p @ V - V[indices]) / (temperature * B)
    return grad + proximal_grad(features, memory, indices, proximal) if proximal > 0 else grad


# --------------------------------------------------------------------------- #
# docs/method.md#evaluation-weighted-k-nearest-neighbours: weighted kNN                                                       #
# --------------------------------------------------------------------------- #
def knn_topk(queries, bank, k):
    """(similarities, indices) of the k largest inner products per query (Q x k, float64),
    sorted by similarity descending, ties to the lower bank index (stable sort)."""
    sim = _f64(queries) @ _f64(bank).t()                          # Q x N
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return sim.gather(1, order), order


def knn_scores(queries, bank, bank_labels, k, temperature, num_classes):
    """Class scores (Q x C): sum over the top-k neighbours of exp(sim / sigma).

    Ties in similarity go to the lower bank index (stable sort)."""
    sim = _f64(queries) @ _f64(bank).t()                          # Q x N
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    top_sim = sim.gather(1, order)
    top_lab = bank_labels[order]
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64, device=queries.device)
    scores.scatter_add_(1, top_lab, torch.exp(top_sim / temperature))
    return scores


def knn_topk_accuracy(scores, labels):
    """(top-1, top-5) accuracy in percent from class scores."""
    k5 = min(5, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    top1 = (order[:, 0] == labels).double().mean().item() * 100
    top5 = (order[:, :k5] == labels.view(-1, 1)).any(1).double().mean().item() * 100
    return top1, top5


# --------------------------------------------------------------------------- #
# Shared negatives (ops/nce_shared.py): one set of K negatives for the batch   #
# --------------------------------------------------------------------------- #
def shared_nce_forward(features, memory, indices, neg_indices, *, temperature, z=0.0, loss_type="nce",
                       proximal=0.0, z_ema=0.0, noise_probs=None, exclude_positive=False):
    """(loss, dloss/dfeatures, Z) in float64 with the K shared negatives neg_indices (K,):
    row b scores [y[b], n_1..n_K]. exclude_positive drops entry (b, k) with n_k == y[b] from
    every sum of row b (its terms, its softmax, the Z mean). The gradient is autograd's."""
    B, K, N = features.shape[0], neg_indices.shape[0], memory.shape[0]
    T = temperature
    idx = index_matrix(indices, neg_indices.view(1, -1).expand(B, K))
    keep = torch.ones(B, K + 1, dtype=torch.bool)
    if exclude_positive:
        keep[:, 1:] = neg_indices.view(1, -1) != indices.view(-1, 1)
    F = _f64(features).requires_grad_()
    s = torch.einsum("bkd,bd->bk", _f64(memory)[idx], F)                 # B x (K+1)
    Z = torch.tensor(float(z), dtype=torch.float64)
    if loss_type in ("infonce", 1):
        logits = (s / T).masked_fill(~keep, float("-inf"))
        loss = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    else:
        if z <= 0 or z_ema > 0:
            est = N * torch.exp(s.detach()[keep] / T).mean()
            Z = est if z <= 0 else z_ema * float(z) + (1 - z_ema) * est
        P = torch.exp(s / T) / Z
        c = K * noise_prob(idx, N, noise_probs) + EPS
        c = c.expand(B, K + 1)
        ln_pos = torch.log(P[:, 0] / (P[:, 0] + c[:, 0]))
        ln_neg = torch.log((c[:, 1:] - EPS) / (P[:, 1:] + c[:, 1:]))
        loss = -(ln_pos.sum() + ln_neg[keep[:, 1:]].sum()) / B
    if proximal > 0:
        diff = F - _f64(memory)[indices]
        loss = loss + proximal * (diff * diff).sum() / B
    (grad,) = torch.autograd.grad(loss, F)
    return loss.detach(), grad, Z


# --------------------------------------------------------------------------- #
# NCE normaliser policies (ops/z_policy.py)                                    #
# --------------------------------------------------------------------------- #
def exact_z(features, memory, temperature):
    """Z = mean_b sum_j exp(V[j].F[b] / T): the exact partition function over the whole
    bank, averaged over the batch (built from the full B x N logits)."""
    return torch.exp(softmax_logits(features, memory, temperature)).sum(1).mean()


def bias_corrected_ema_z(estimates, factor):
    """Z_t = m_t / (1 - a^t), m_t = a m_(t-1) + (1 - a) est_t, m_0 = 0, for t = 1..len(estimates)."""
    m, out = 0.0, []
    for t, est in enumerate(estimates, 1):
        m = factor * m + (1 - factor) * float(est)
        out.append(m / (1 - factor ** t))
    return out
