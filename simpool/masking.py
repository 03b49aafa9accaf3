"""Which patches of the student's global crops to mask (iBOT / AttMask).

Follows AttMask's ``attmask.py`` / ``main_attmask.py`` (Kakogeorgiou et al., ECCV 2022)
for the attention-guided modes and iBOT's ``loader.py`` (copied by AttMask) for the
ratio draw and the ``rand`` / ``block`` modes. Modes (``pred_shape``):

  * ``attmask_high``: mask the ``int(N * ratio)`` most attended patches;
  * ``attmask_low``:  mask the ``int(N * ratio)`` least attended patches;
  * ``attmask_hint``: as ``attmask_high``, then reveal ``int(show_ratio * N)`` patches
    drawn uniformly among the top ``int(show_max * N)``, where by default (AttMask)
    ``show_ratio = show_max * <a second, independent ratio draw>``;
  * ``rand``:  ``int(ratio * H * W)`` uniformly random patches;
  * ``block``: iBOT's BEiT-style block-wise masking (rectangles) up to ``ratio * H * W``.

A ratio draw: ``pred_ratio`` and ``pred_ratio_var`` are floats or lists (a scalar var is
repeated for every ratio); each pair (m, v) gives ``uniform(m - v, m + v)`` (m if v is 0)
and one of them is picked at random, so ``[0, 0.3]`` with ``[0, 0.2]`` masks nothing in
half the draws and ``0.3 +- 0.2`` in the others. The ``attmask_*`` modes draw ONE ratio
per call, shared by the whole batch of crops, and keep each crop's mask only with
probability ``masking_prob``; ``rand`` and ``block`` draw a ratio per crop and mask every
crop (``masking_prob`` does not apply, as in AttMask). The attention-guided modes rank
patches by an attention map (B, N), here SimPool's map from the teacher on the same crop.

Example:
    >>> attn = torch.rand(4, 49)
    >>> mask = make_masks(attn, (7, 7), "attmask_high", pred_ratio=0.3, masking_prob=1.0)
    >>> mask.shape, mask.sum(1).tolist()
    (torch.Size([4, 49]), [14, 14, 14, 14])
    >>> hint = make_masks(attn, (7, 7), "attmask_hint", pred_ratio=0.3, masking_prob=1.0, show_max=0.2)
    >>> hint.sum(1).tolist()  # 14 masked, int(0.2 * 0.3 * 49) = 2 of the top 9 revealed
    [12, 12, 12, 12]
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

PRED_SHAPES = ("attmask_high", "attmask_low", "attmask_hint", "rand", "block")
__all__ = ["PRED_SHAPES", "make_masks", "block_mask", "draw_pred_ratios", "pred_ratio_pairs"]


def pred_ratio_pairs(
    pred_ratio: float | Sequence[float], pred_ratio_var: float | Sequence[float]
) -> tuple[list[float], list[float]]:
    """(means, vars) as equal-length lists of floats, validated as iBOT's loader would."""

    def as_list(x: float | Sequence[float]) -> list[float]:
        return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)]

    means, vars_ = as_list(pred_ratio), as_list(pred_ratio_var)
    if not means or not vars_:
        raise ValueError("pred_ratio and pred_ratio_var must not be empty")
    if len(vars_) == 1:
        vars_ = vars_ * len(means)
    elif len(means) != len(vars_):
        raise ValueError(
            f"pred_ratio has {len(means)} values but pred_ratio_var has {len(vars_)}: give one var, or one per ratio"
        )
    for m, v in zip(means, vars_):
        if m < 0 or v < 0:
            raise ValueError(f"pred_ratio {m} and pred_ratio_var {v} must be >= 0")
        if v > m:
            raise ValueError(f"pred_ratio_var {v} exceeds pred_ratio {m}: the ratio would go below 0")
        if m + v > 1:
            raise ValueError(f"pred_ratio {m} + pred_ratio_var {v} exceeds 1: the ratio would go above 1")
    return means, vars_


def draw_pred_ratios(
    pred_ratio: float | Sequence[float],
    pred_ratio_var: float | Sequence[float],
    n: int,
    generator: torch.Generator | None = None,
) -> list[float]:
    """``n`` independent masking ratios (Python floats), iBOT's ``get_pred_ratio``.

    Each pair (m, v) gives ``uniform(m - v, m + v)`` (m if v is 0), then one pair's
    value is picked uniformly. Draws use ``generator`` (a CPU one) or torch's global RNG.
    """
    means, vars_ = pred_ratio_pairs(pred_ratio, pred_ratio_var)
    m = torch.tensor(means, dtype=torch.float64)
    v = torch.tensor(vars_, dtype=torch.float64)
    u = torch.rand(n, len(means), generator=generator, dtype=torch.float64)
    lo, hi = m - v, m + v
    ratios = torch.where(v > 0, lo + (hi - lo) * u, m)
    if len(means) > 1:
        pick = torch.randint(len(means), (n,), generator=generator)
        ratios = ratios.gather(1, pick[:, None])
    return ratios[:, 0].tolist()


def _rand(shape: int | tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform noise on ``device``: from ``generator`` (then moved) or the global RNG there."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _top(scores: torch.Tensor, count: int, descending: bool) -> torch.Tensor:
    """Bool mask (B, N) of the ``count`` highest (lowest) scores of every row."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        mask.scatter_(1, scores.argsort(dim=1, descending=descending)[:, :count], True)
    return mask


def make_masks(
    attention: torch.Tensor,
    grid: tuple[int, int],
    pred_shape: str,
    pred_ratio: float | Sequence[float] = 0.3,
    pred_ratio_var: float | Sequence[float] = 0.0,
    masking_prob: float = 0.5,
    show_max: float = 0.1,
    show_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean masks (B, N) with True = masked, for B crops of ``grid`` = (h, w) patches.

    ``attention`` (B, N) is required by the ``attmask_*`` modes and only gives B and the
    device otherwise (pass any (B, N) tensor). ``pred_ratio`` / ``pred_ratio_var``: floats
    or lists (see the module docstring). ``masking_prob`` applies to the ``attmask_*`` modes
    only. ``show_ratio`` (``attmask_hint``): fraction of all patches revealed; ``None`` is
    AttMask's ``show_max * <an independent ratio draw>``. ``generator``: a CPU
    ``torch.Generator`` for every torch draw (ratios included); ``block`` rectangles use
    Python's ``random``.
    """
    if pred_shape not in PRED_SHAPES:
        raise ValueError(f"pred_shape must be one of {PRED_SHAPES}, got {pred_shape!r}")
    B, N = attention.shape
    H, W = grid
    if N != H * W:
        raise ValueError(f"attention has {N} tokens but the patch grid is {H}x{W}")
    if not 0 <= masking_prob <= 1:
        raise ValueError(f"masking_prob must be in [0, 1], got {masking_prob}")
    if not 0 <= show_max <= 1 or (show_ratio is not None and not 0 <= show_ratio <= 1):
        raise ValueError(f"show_max and show_ratio must be in [0, 1], got {show_max} and {show_ratio}")
    device = attention.device

    if pred_shape in ("rand", "block"):  # iBOT's loader: a ratio per crop, every crop masked
        highs = [r * H * W for r in draw_pred_ratios(pred_ratio, pred_ratio_var, B, generator)]
        if pred_shape == "block":
            return torch.stack([block_mask(grid, high) for high in highs]).to(device)
        counts = torch.tensor([int(high) for high in highs], device=device)
        rank = _rand((B, N), generator, device).argsort(dim=1).argsort(dim=1)
        return rank < counts[:, None]

    # AttMask: one ratio for the whole batch, each crop kept with probability masking_prob
    ratio = draw_pred_ratios(pred_ratio, pred_ratio_var, 1, generator)[0]
    scores = attention.detach().float()
    mask = _top(scores, int(N * ratio), descending=pred_shape != "attmask_low")
    mask &= (_rand(B, generator, device) <= masking_prob)[:, None]  # AttMask drops rand > masking_prob
    if pred_shape == "attmask_hint":
        if show_ratio is None:
            show_ratio = show_max * draw_pred_ratios(pred_ratio, pred_ratio_var, 1, generator)[0]
        n_top = int(N * show_max)
        n_reveal = min(int(show_ratio * N), n_top)
        if n_reveal > 0:  # uniform without replacement among each crop's top n_top tokens
            noise = _rand((B, N), generator, device).masked_fill(~_top(scores, n_top, True), 2.0)
            mask &= ~_top(noise, n_reveal, descending=False)
    return mask


def block_mask(
    grid: tuple[int, int],
    num_masking: float,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """iBOT's (BEiT-style) block-wise mask on an (H, W) grid, flattened to (H*W,) bools.

    ``num_masking`` is iBOT's float target ``ratio * H * W``: rectangles are added while
    fewer patches are masked, each of area uniform in [(min(H, W) // 3) ** 2, what is left],
    log-uniform aspect ratio in [min_aspect, 1 / min_aspect], strictly smaller than the grid
    (h < H, w < W), and accepted only if it masks at least one new patch and no more than
    what is left; after ``max_attempts`` failed rectangles in a row it stops. The count
    never exceeds ``num_masking``. Uses ``rng`` (a ``random.Random``) or Python's ``random``
    (seeded per process by the trainer).
    """
    rng = random if rng is None else rng
    H, W = grid
    mask = np.zeros((H, W), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    min_area = (min(H, W) // 3) ** 2
    count = 0
    while count < num_masking:
        left_over = num_masking - count
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min_area, left_over)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < H and w < W:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= left_over:
                    window[...] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return torch.from_numpy(mask.reshape(-1))
