"""Self-distillation losses: DINO on pooled vectors, iBOT on masked patch tokens.

Both sharpen the teacher with a temperature after subtracting a centre that is an
EMA of the teacher's outputs (all-reduced over ranks), and take the cross-entropy
of the student's tempered softmax against it. Logits are upcast to fp32. With
``centering="sinkhorn_knopp"`` (DINOv2) the teacher's targets are instead balanced over
the prototypes by a few Sinkhorn-Knopp iterations on the batch, which gives sharp,
non-collapsed targets from the first steps. ``koleo_loss`` is DINOv2's KoLeo regulariser,
which spreads the student's image vectors within a batch.

Example:
    >>> loss_fn = DINOLoss(out_dim=8, ncrops=4)
    >>> student = torch.randn(4 * 2, 8)   # 2 global + 2 local crops of a batch of 2
    >>> teacher = torch.randn(2 * 2, 8)   # teacher sees the 2 global crops only
    >>> loss = loss_fn(student, teacher, teacher_temp=0.04)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DINOLoss", "PatchLoss", "CENTERINGS", "sinkhorn_knopp", "koleo_loss", "collapse_warning"]

CENTERINGS = ("ema", "sinkhorn_knopp")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) balanced over the K prototypes (Cuturi 2013; SwAV, DINOv2): starting
    from exp(logits / temp), alternately give every prototype the same total mass over the batch
    (all ranks) and every row unit mass; ``iterations`` rounds, ending with the rows.

    Example:
        >>> q = sinkhorn_knopp(torch.randn(6, 4), 0.1)
        >>> torch.allclose(q.sum(-1), torch.ones(6))
        True
    """
    logits = _fp32(teacher_output) / teacher_temp
    q = torch.exp(logits - logits.max())  # one shift for all rows: the iterations rescale anyway
    rows = _all_reduce_sum_(q.new_tensor([float(q.shape[0])]))
    q /= _all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum_(q.sum(0, keepdim=True)) * q.shape[1]  # each prototype: 1/K of the mass
        q /= q.sum(1, keepdim=True) * rows  # each row: 1/N
    return q * rows


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): minus the mean log distance of each
    L2-normalised row of ``features`` (B, D) to its nearest other row; it pushes the vectors of a
    batch apart, which k-NN retrieval rewards.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> round(koleo_loss(x).item(), 4)  # every nearest neighbour at distance sqrt(2)
        -0.3466
    """
    if features.shape[0] < 2:  # no other row to be apart from
        return features.sum() * 0.0
    x = F.normalize(_fp32(features), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-view DINO loss.

    ``student_output``: (ncrops * B, K), crops stacked in order (the global crops, then
    locals). ``teacher_output``: (global_crops * B, K) for the global crops (DINO: 2). Every
    teacher crop is paired with every student crop except its own view; the loss is the
    mean over those pairs of the batch-mean cross-entropy.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        global_crops: int = 2,
        centering: str = "ema",
    ) -> None:
        super().__init__()
        if not 1 <= global_crops <= ncrops or ncrops == 1:
            raise ValueError(f"{global_crops} global crops of {ncrops} make no pair of different views")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.ncrops = ncrops
        self.global_crops = global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        K = student_output.shape[-1]
        # crops are stacked in order, so (ncrops, B, K) is a view: no copy of the logits
        log_p = F.log_softmax(_fp32(student_output) / self.student_temp, dim=-1).view(self.ncrops, -1, K)
        G = self.global_crops
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(teacher_output, teacher_temp).view(G, -1, K)
        else:
            q = F.softmax((_fp32(teacher_output) - self.center) / teacher_temp, dim=-1).view(G, -1, K)
        # Sum over all student views once, then remove each teacher view's own pair:
        # sum_{v != t} q_t . log p_v = q_t . (sum_v log p_v) - q_t . log p_t
        all_views = torch.einsum("tbk,bk->tb", q, log_p.sum(0))
        same_view = (q * log_p[:G]).sum(-1)
        n_pairs = G * self.ncrops - G
        loss = -(all_views - same_view).mean(-1).sum() / n_pairs
        self.update_center(teacher_output)
        with torch.no_grad():  # collapse monitors: ~log(K) per image = uniform; ~0 over the batch = one prototype
            mean_q = q.mean(dim=(0, 1))
            self.teacher_entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
            self.teacher_batch_entropy = -(mean_q * mean_q.clamp_min(1e-12).log()).sum()
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = _all_reduce_mean_(teacher_output.float().mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class PatchLoss(nn.Module):
    """iBOT loss on masked patch tokens: for each (view, sample), the mean over its
    masked tokens of the cross-entropy between the teacher's sharpened, centred
    distribution for that token (computed on the unmasked crop) and the student's
    prediction for it (computed on the masked crop); then the mean over views and
    samples, samples without masked tokens counting as zero (as in iBOT).

    Inputs are gathered masked tokens only, which saves the head's work on the rest:
    ``student_patch`` and ``teacher_patch`` (M, K), and ``sample_index`` (M,) giving
    each token's row in the (num_samples,) list of (view, sample) pairs. The centre is
    the EMA of the mean of the teacher's outputs over those masked tokens, on all ranks.
    """

    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "ema"
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    def forward(
        self,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        sample_index: torch.Tensor,
        num_samples: int,
        teacher_temp: float,
    ) -> torch.Tensor:
        log_p = F.log_softmax(_fp32(student_patch) / self.student_temp, dim=-1)
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(teacher_patch, teacher_temp)
        else:
            q = F.softmax((_fp32(teacher_patch) - self.center) / teacher_temp, dim=-1)
        token_loss = -(q * log_p).sum(-1)
        per_sample = token_loss.new_zeros(num_samples).index_add_(0, sample_index, token_loss)
        counts = token_loss.new_zeros(num_samples).index_add_(0, sample_index, torch.ones_like(token_loss))
        loss = (per_sample / counts.clamp(min=1.0)).mean()
        self.update_center(teacher_patch)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch: torch.Tensor) -> None:
        # sum and count over all ranks: every masked token weighs the same, whichever rank (and
        # however many masked tokens) it came from; no masked token anywhere keeps the centre
        stats = torch.cat(
            [teacher_patch.float().sum(0), teacher_patch.new_full((1,), teacher_patch.shape[0], dtype=torch.float32)]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, count = stats[None, :-1], stats[-1]
        batch_center = torch.where(count > 0, total / count.clamp(min=1), self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def collapse_warning(stats: Mapping[str, float], out_dim: int) -> str | None:
    """A warning naming DINO's failure mode seen in an epoch's mean ``teacher_entropy`` and
    ``teacher_batch_entropy`` (``DINOLoss``'s monitors), else None: the teacher's outputs uniform for
    every image (entropy ~ log K) or one prototype for all (batch entropy ~ 0)."""
    if "teacher_entropy" not in stats:
        return None
    log_k = math.log(out_dim)
    if stats["teacher_entropy"] > 0.95 * log_k:
        return (
            f"warning: possible collapse: the teacher's outputs are nearly uniform (entropy "
            f"{stats['teacher_entropy']:.2f} of {log_k:.2f}); try a lower --teacher_temp or --lr, or "
            "a longer --warmup_epochs"
        )
    if stats["teacher_batch_entropy"] < 0.1 * log_k:
        return (
            f"warning: possible collapse: the teacher maps the whole batch onto a few prototypes "
            f"(batch entropy {stats['teacher_batch_entropy']:.2f} of {log_k:.2f}); try a lower --lr "
            "or a higher --teacher_temp"
        )
    return None
