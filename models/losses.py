"""Loss terms shared by the hashing models, as plain functions of tensors.

Each function takes continuous codes (and labels) of a batch and returns a scalar.
Models combine them with their own weights, so one formula is written once and
tested once. Codes are ``(B, K)`` rows; labels are multi-hot ``(B, C)`` rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------- label similarities
def label_overlap(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """``S_ij = 1`` when sample i of ``a`` and sample j of ``b`` share a label, else 0.

    ``clamp`` then ``sign`` is ``> 0`` as a float op (exactly 0 or 1): about 5x faster on
    the CPU than a comparison to bool and back at SCAHN's (64, 4324)."""
    return (labels_a.float() @ labels_b.float().t()).clamp_(min=0).sign_().float()


def label_cosine(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of L2-normalised label vectors, in [0, 1] (CASH's coarse target)."""
    return F.normalize(labels_a.float(), dim=1, eps=1e-8) @ F.normalize(labels_b.float(), dim=1, eps=1e-8).t()


def sigmoid_label_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor, scale: float = 16.0) -> torch.Tensor:
    """``2 sigmoid(y_i . y_j / scale) - 1``: 0 for no shared label, growing with the
    number of shared labels (PBEH's similarity target)."""
    return 2.0 * torch.sigmoid((labels_a.float() @ labels_b.float().t()) / scale) - 1.0


# ---------------------------------------------------------------------- code regularisers
def quantization_loss(u: torch.Tensor) -> torch.Tensor:
    """``mean((sign u - u)^2)``: pulls continuous codes towards the binary corners."""
    return (torch.sign(u).detach() - u).pow(2).mean()


def bit_balance_loss(u: torch.Tensor) -> torch.Tensor:
    """``mean_j (mean_i tanh u_ij)^2``: every bit should be +1 for half of the batch."""
    return torch.tanh(u).mean(dim=0).pow(2).mean()


def quantization_balance_loss(u: torch.Tensor) -> torch.Tensor:
    """CASH's first term for one code matrix: quantisation plus bit balance."""
    return quantization_loss(u) + bit_balance_loss(u)


# ---------------------------------------------------------------------- pairwise / contrastive
def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: row i of ``a`` and row i of ``b`` are the
    positive pair, every other row is a negative. Logits are plain dot products over
    ``temperature`` (the codes are already normalised by the caller's network); the
    two directions are averaged."""
    logits = (a @ b.t()) / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def label_similarity_mse(
    codes: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, bank_labels: torch.Tensor
) -> torch.Tensor:
    """CASH's coarse term: ``mean((ReLU(u_B U^T) - yhat_B yhat_U^T)^2)`` where ``U`` is a
    bank of (detached) codes of the whole train set and ``yhat`` are L2-normalised labels."""
    return (F.relu(codes @ bank.t()) - label_cosine(labels, bank_labels)).pow(2).mean()


def inner_product_mse(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((a b^T - target)^2)``: pairwise code inner products regressed on a target."""
    return F.mse_loss(a @ b.t(), target)


def cosine_alignment_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PBEH's cross-modal term ``sum_i (1 - cos(a_i, b_i)) + (1 - cos(sign a_i, sign b_i))``.

    The second sum has no gradient (``sign``); it is kept so the logged value is the
    authors' quantity, and it measures how many bits of a pair still disagree."""
    cont = (1.0 - F.cosine_similarity(a, b, dim=1)).sum()
    binary = (1.0 - F.cosine_similarity(torch.sign(a), torch.sign(b), dim=1, eps=1e-8)).sum()
    return cont + binary.detach()


def supervised_contrastive_loss(
    codes: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, include_self: bool = False,
) -> torch.Tensor:
    """Supervised contrastive loss within one modality: positives of a sample are the
    samples that share at least one label with it. ``include_self`` False is Khosla
    et al.'s form (the anchor is in neither the positives nor the denominator); True is
    the PBEH public code's (the anchor counts as one of its own positives and in the
    denominator). Samples without any positive are skipped."""
    n = codes.shape[0]
    logits = (codes @ codes.t()) / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=codes.device)
    pos = label_overlap(labels, labels).bool()
    if include_self:
        pos = pos | self_mask
    else:
        logits = logits.masked_fill(self_mask, float("-inf"))
        pos = pos & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = pos.sum(dim=1)
    keep = count > 0
    if not bool(keep.any()):
        return codes.new_zeros(())
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(pos_log_prob[keep] / count[keep]).mean()


# ---------------------------------------------------------------------- continual terms
def gate_loss(pos_logits: torch.Tensor) -> torch.Tensor:
    """The CASH public code's task-head objective, positives only: ``mean(1 - sigmoid(logit))``
    over the current task's samples (it opens the gate; nothing teaches the head to close it)."""
    return (1 - torch.sigmoid(pos_logits)).mean()


def task_discrimination_loss(pos_logits: torch.Tensor, neg_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Task-vs-others objective of a task head: binary cross-entropy with the current
    task's samples as positives and saved samples of other tasks as negatives (when
    given); positives and negatives are averaged separately so neither side dominates."""
    loss = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits))
    if neg_logits is not None and neg_logits.numel():
        loss = loss + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    return loss


def anchor_l1(current: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """``sum |current - saved|``: keeps re-computed codes where they were saved."""
    return (current - saved).abs().sum()
