"""Self-distillation losses: DINO on pooled vectors, iBOT on masked patch tokens.

Both sharpen the teacher with a temperature after subtracting a centre that is an
EMA of the teacher's outputs (all-reduced over ranks), and take the cross-entropy
of the student's tempered softmax against it. Logits are upcast to fp32.

Example:
    >>> loss_fn = DINOLoss(out_dim=8, ncrops=4)
    >>> student = torch.randn(4 * 2, 8)   # 2 global + 2 local crops of a batch of 2
    >>> teacher = torch.randn(2 * 2, 8)   # teacher sees the 2 global crops only
    >>> loss = loss_fn(student, teacher, teacher_temp=0.04)
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOLoss", "PatchLoss"]


def _fp32(t):
    """At least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _all_reduce_mean_(t):
    """Average ``t`` over ranks in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class DINOLoss(nn.Module):
    """Cross-view DINO loss.

    ``student_output``: (ncrops * B, K), crops stacked in order (the global crops, then
    locals). ``teacher_output``: (global_crops * B, K) for the global crops (DINO: 2). Every
    teacher crop is paired with every student crop except its own view; the loss is the
    mean over those pairs of the batch-mean cross-entropy.
    """

    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9, global_crops=2):
        super().__init__()
        if not 1 <= global_crops <= ncrops or ncrops == 1:
            raise ValueError(f"{global_crops} global crops of {ncrops} make no pair of different views")
        self.ncrops = ncrops
        self.global_crops = global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, teacher_temp):
        K = student_output.shape[-1]
        # crops are stacked in order, so (ncrops, B, K) is a view: no copy of the logits
        log_p = F.log_softmax(_fp32(student_output) / self.student_temp, dim=-1).view(self.ncrops, -1, K)
        G = self.global_crops
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
    def update_center(self, teacher_output):
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

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    def forward(self, student_patch, teacher_patch, sample_index, num_samples, teacher_temp):
        log_p = F.log_softmax(_fp32(student_patch) / self.student_temp, dim=-1)
        q = F.softmax((_fp32(teacher_patch) - self.center) / teacher_temp, dim=-1)
        token_loss = -(q * log_p).sum(-1)
        per_sample = token_loss.new_zeros(num_samples).index_add_(0, sample_index, token_loss)
        counts = token_loss.new_zeros(num_samples).index_add_(0, sample_index, torch.ones_like(token_loss))
        loss = (per_sample / counts.clamp(min=1.0)).mean()
        self.update_center(teacher_patch)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch):
        # sum and count over all ranks: every masked token weighs the same, whichever rank (and
        # however many masked tokens) it came from; no masked token anywhere keeps the centre
        stats = torch.cat([teacher_patch.float().sum(0), teacher_patch.new_full((1,), teacher_patch.shape[0],
                                                                                  dtype=torch.float32)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, count = stats[None, :-1], stats[-1]
        batch_center = torch.where(count > 0, total / count.clamp(min=1), self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
