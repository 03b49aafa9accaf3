"""Which patches of the student's global crops to mask (iBOT / AttMask).

Modes (``pred_shape``):
  * ``attmask_high``: mask the most attended patches (Kakogeorgiou et al., ECCV 2022);
  * ``attmask_low``:  mask the least attended patches;
  * ``attmask_hint``: mask the most attended patches, then reveal a random
    ``show_ratio`` of all patches chosen among the top ``show_max`` most attended;
  * ``rand``:  uniformly random patches;
  * ``block``: BEiT/iBOT block-wise masking (rectangles of patches).

Each sample gets its own ratio, uniform in ``pred_ratio ± pred_ratio_var``, and is
masked at all only with probability ``masking_prob``. The attention-guided modes
rank patches by an attention map (B, N), here SimPool's map from the teacher on the
same crop.

Example:
    >>> attn = torch.rand(4, 49)
    >>> mask = make_masks(attn, (7, 7), "attmask_high", pred_ratio=0.3, masking_prob=1.0)
    >>> mask.shape, mask.sum(1).tolist()
    (torch.Size([4, 49]), [14, 14, 14, 14])
"""
import math
import random

import torch

PRED_SHAPES = ("attmask_high", "attmask_low", "attmask_hint", "rand", "block")
__all__ = ["PRED_SHAPES", "make_masks", "block_mask"]


def _rank(scores, descending):
    """Per-row rank of each entry (0 = first in the requested order)."""
    order = scores.argsort(dim=1, descending=descending)
    return order.argsort(dim=1)


def make_masks(attention, grid, pred_shape, pred_ratio=0.3, pred_ratio_var=0.0, masking_prob=0.5,
               show_max=0.1, show_ratio=0.1, generator=None):
    """Boolean masks (B, N) with True = masked, for B crops of ``grid`` = (h, w) patches.

    ``attention`` (B, N) is required by the ``attmask_*`` modes and only gives B and the
    device otherwise (pass any (B, N) tensor).
    """
    if pred_shape not in PRED_SHAPES:
        raise ValueError(f"pred_shape must be one of {PRED_SHAPES}, got {pred_shape!r}")
    B, N = attention.shape
    if N != grid[0] * grid[1]:
        raise ValueError(f"attention has {N} tokens but the patch grid is {grid[0]}x{grid[1]}")
    device = attention.device
    low, high = max(pred_ratio - pred_ratio_var, 0.0), min(pred_ratio + pred_ratio_var, 1.0)
    ratios = low + (high - low) * torch.rand(B, generator=generator).to(device)
    counts = (ratios * N).floor().long()
    counts = torch.where(torch.rand(B, generator=generator).to(device) < masking_prob, counts, 0)
    if pred_shape == "block":
        return torch.stack([block_mask(grid, int(c)) for c in counts.tolist()]).to(device)
    if pred_shape == "rand":
        rank = _rank(torch.rand(B, N, generator=generator).to(device), descending=False)
        return rank < counts[:, None]
    rank = _rank(attention.float(), descending=pred_shape != "attmask_low")
    mask = rank < counts[:, None]
    if pred_shape == "attmask_hint":
        # Reveal show_ratio*N tokens picked at random among the top show_max*N.
        top = rank < int(show_max * N)
        n_reveal = min(int(show_ratio * N), int(top.sum(1).min()))
        if n_reveal > 0:
            noise = torch.rand(B, N, generator=generator).to(device).masked_fill(~top, 2.0)
            mask &= ~(_rank(noise, descending=False) < n_reveal)
    return mask


def block_mask(grid, num_masking, min_num_patches=4, min_aspect=0.3, max_tries=10):
    """iBOT/BEiT block-wise mask of about ``num_masking`` patches on an (h, w) grid.

    Rectangles of random area and log-uniform aspect ratio are added until the
    count is reached or no rectangle fits; uses Python's ``random`` (seeded per
    process by the trainer).
    """
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        budget = num_masking - count
        added = 0
        for _ in range(max_tries):
            target = random.uniform(min(min_num_patches, budget), budget)
            aspect = math.exp(random.uniform(*log_aspect))
            bh = int(round(math.sqrt(target * aspect)))
            bw = int(round(math.sqrt(target / aspect)))
            if not (0 < bh <= h and 0 < bw <= w):
                continue
            top, left = random.randint(0, h - bh), random.randint(0, w - bw)
            window = mask[top:top + bh, left:left + bw]
            new = int((~window).sum())
            if 0 < new <= budget:
                window.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask.flatten()
