"""Non-parametric softmax / NCE over memory-bank samples (InstDisc, Wu et al. 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import distributed
from dist_contrast.losses.checks import (
    check_choice,
    check_gather,
    check_input,
    check_input_pair,
    check_positive,
    check_temperature,
)
from dist_contrast.losses.kernels.numerics import fp32_region, normalize
from dist_contrast.losses.reduce import global_count, global_mean

MODES = ("nce", "softmax")


def _check_n_data(n_data: int | None) -> int:
    if n_data is None or isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
        raise ValueError(f"mode 'nce' needs n_data, the data set size (an int >= 1), got {n_data}")
    return n_data


def check_nce_args(mode: str, n_data: int | None, z: float | None) -> int | None:
    """The checks of the NCE objectives' common arguments; returns ``n_data`` (needed in mode
    "nce" only)."""
    check_choice(mode, "mode", MODES)
    if mode == "nce":
        n_data = _check_n_data(n_data)
    if z is not None:
        check_positive(z, "z")
    return n_data


def nce_log_z(lse: torch.Tensor, count: float | torch.Tensor, n_data: int) -> torch.Tensor:
    """InstDisc's ``log Z`` for ``Z = n_data * mean(exp(logits))``, from the log-sum-exp of
    all ``count`` logits (fp64, no gradient: the callers combine the ranks' parts)."""
    log_count = torch.log(count) if isinstance(count, torch.Tensor) else math.log(count)
    return lse - log_count + math.log(n_data)


def nce_terms(
    log_p_pos: torch.Tensor, log_p_neg: torch.Tensor, log_k_noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstDisc's NCE terms from ``log P = s / T - log Z``, with ``h = P / (P + K P_n)``:
    ``-log h(pos)`` [B] for the positives' [B] and ``-log(1 - h(neg))`` [B, K] for the
    negatives' [B, K] (``log_k_noise = log(K P_n) = log(K / n_data)``)."""
    return F.softplus(log_k_noise - log_p_pos), F.softplus(log_p_neg - log_k_noise)


def _logits(features, positives, negatives, temperature) -> torch.Tensor:
    """Validated [B, 1 + K] logits: the positive bank row first, then the K negatives."""
    check_input_pair(features, positives, "features", "positives")
    if not isinstance(negatives, torch.Tensor) or negatives.dim() not in (2, 3):
        got = tuple(negatives.shape) if isinstance(negatives, torch.Tensor) else negatives
        raise ValueError(f"negatives must have shape [K, D] or [B, K, D], got {got}")
    check_input(negatives, "negatives", ndim=negatives.dim())
    b, dim = features.shape
    if negatives.shape[-1] != dim or (negatives.dim() == 3 and negatives.shape[0] != b):
        raise ValueError(
            f"negatives must have shape [K, {dim}] or [{b}, K, {dim}], got {tuple(negatives.shape)}"
        )
    check_temperature(temperature)
    f, p, neg = normalize(features), normalize(positives), normalize(negatives)
    pos = (f * p).sum(dim=1, keepdim=True)
    negs = f @ neg.T if neg.dim() == 2 else torch.einsum("bd,bkd->bk", f, neg)
    return torch.cat([pos, negs], dim=1) / temperature


def _log_z(logits: torch.Tensor, n_data: int, use_gather: bool) -> torch.Tensor:
    """log Z with Z = n_data * mean(exp(logits)) over every rank's [B, 1 + K] logits."""
    with torch.no_grad():
        flat = logits.detach().double().flatten()
        stats = torch.stack([torch.logsumexp(flat, 0), flat.new_tensor(flat.numel())])
        if use_gather and distributed.world_size() > 1:
            stats = distributed.all_gather_no_grad(stats[None])
        lse = torch.logsumexp(stats.view(-1, 2)[:, 0], 0)
        return nce_log_z(lse, stats.view(-1, 2)[:, 1].sum(), n_data)


def estimate_nce_z(
    features: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    n_data: int | None = None,
    gather_mode: str = "all",
) -> float:
    """InstDisc's normalisation constant from one batch: ``Z = n_data * mean(exp(s / T))``
    over the positive and negative similarities of every rank (``"all"``) or this rank."""
    n_data = _check_n_data(n_data)
    use_gather = check_gather(gather_mode)
    with fp32_region():
        logits = _logits(features, positives, negatives, temperature)
        return float(_log_z(logits, n_data, use_gather).exp())


def nce_loss(
    features: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    mode: str = "nce",
    n_data: int | None = None,
    z: float | None = None,
    gather_mode: str = "all",
) -> torch.Tensor:
    """InstDisc's objective for features against memory-bank rows.

    Inputs: ``features`` [B, D] (this step's embeddings), ``positives`` [B, D] (each sample's
    own bank row) and ``negatives`` sampled from the bank, [K, D] shared or [B, K, D] per
    sample. All are L2-normalised and similarities divided by ``temperature`` (0.07).

    - ``mode="softmax"``: the non-parametric softmax restricted to the sampled rows: mean
      cross-entropy of the positive among the 1 + K.
    - ``mode="nce"`` (Wu et al. 2018, eq. 5-7, and their code): P(i|v) = exp(s_i / T) / Z,
      noise distribution uniform P_n = 1 / ``n_data``, K noise samples. Per sample the loss is
      ``-log h(pos) - sum_negatives log(1 - h(neg))`` with ``h = P / (P + K P_n)``, averaged
      over the batch. ``Z`` is the given ``z``, or estimated from this batch as
      ``n_data * mean(exp(s / T))`` over the 1 + K similarities without gradient (Wu et al.
      estimate it on the first batch and keep it: :class:`NCELoss` does). Computed in log
      space (the reference adds 1e-7 to the denominators; this does not).

    Distributed: every term is per sample and no embedding is gathered. With
    ``gather_mode="all"`` the sample count is summed over ranks and each rank returns
    ``W * (sum) / N``, the global mean whatever the per-rank batch sizes (uneven batches weight
    samples, not ranks), and an estimated Z is taken over every rank's batch, so all ranks use
    the same Z; with ``"off"`` each rank returns the mean over its samples.
    """
    n_data = check_nce_args(mode, n_data, z)
    use_gather = check_gather(gather_mode)
    with fp32_region():
        logits = _logits(features, positives, negatives, temperature)
        if mode == "softmax":
            targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            total = F.cross_entropy(logits, targets, reduction="sum")
            return global_mean(total, global_count(logits, use_gather), use_gather)
        log_z = math.log(z) if z is not None else _log_z(logits, n_data, use_gather)
        log_p = logits - log_z
        log_k_noise = math.log((logits.shape[1] - 1) / n_data)
        pos_term, neg_terms = nce_terms(log_p[:, 0], log_p[:, 1:], log_k_noise)
        total = (pos_term + neg_terms.sum(dim=1)).sum()
        return global_mean(total, global_count(logits, use_gather), use_gather)


class NCELoss(nn.Module):
    """Module form of :func:`nce_loss`. In mode "nce" it estimates Z on its first call (over
    every rank with ``gather="all"``) and keeps it in the buffer ``z`` (saved in the state
    dict; zero it to estimate it again on the next call), as InstDisc does."""

    def __init__(
        self,
        n_data: int | None = None,
        temperature: float = 0.07,
        mode: str = "nce",
        gather: str = "all",
    ) -> None:
        super().__init__()
        check_choice(mode, "mode", MODES)
        if mode == "nce":
            _check_n_data(n_data)
        check_temperature(temperature)
        check_gather(gather)
        self.n_data, self.temperature, self.mode, self.gather = n_data, temperature, mode, gather
        self.register_buffer("z", torch.zeros((), dtype=torch.float64))

    def forward(
        self, features: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        if self.mode == "nce" and float(self.z) == 0.0:
            z = estimate_nce_z(
                features, positives, negatives, self.temperature, self.n_data, self.gather
            )
            self.z.fill_(z)
        z = float(self.z) if self.mode == "nce" else None
        return nce_loss(
            features,
            positives,
            negatives,
            self.temperature,
            self.mode,
            self.n_data,
            z,
            self.gather,
        )
