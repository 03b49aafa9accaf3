"""Tests for simpool/masking.py: AttMask high/low/hint, random and block masks."""
import math
import random

import pytest
import torch

from simpool.masking import PRED_SHAPES, block_mask, make_masks


def _attention(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g).softmax(-1)  # distinct values, no ties


@pytest.mark.parametrize("pred_shape", PRED_SHAPES)
@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.3), ((14, 14), 0.5), ((4, 6), 0.25), ((5, 5), 0.1)])
def test_requested_counts_with_masking_prob_one(pred_shape, grid, ratio):
    random.seed(0)
    torch.manual_seed(0)
    N = grid[0] * grid[1]
    mask = make_masks(_attention(6, N), grid, pred_shape, pred_ratio=ratio, pred_ratio_var=0.0,
                      masking_prob=1.0, show_max=0.1, show_ratio=0.0)
    assert mask.shape == (6, N) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [math.floor(ratio * N)] * 6


@pytest.mark.parametrize("pred_shape", ["attmask_high", "rand", "block"])
def test_ratio_variance_counts_in_range_and_vary(pred_shape):
    random.seed(1)
    torch.manual_seed(1)
    grid, B = (10, 10), 64
    N = 100
    mask = make_masks(_attention(B, N), grid, pred_shape, pred_ratio=0.3, pred_ratio_var=0.2, masking_prob=1.0)
    counts = mask.sum(1)
    assert counts.min() >= math.floor(0.1 * N) and counts.max() <= math.floor(0.5 * N)
    assert len(set(counts.tolist())) >= 10
    # spread over the range, not all at one end
    assert counts.min() < 20 and counts.max() > 40


def test_ratio_range_is_clipped_to_zero_one():
    # The range pred_ratio ± var is clipped to [0, 1] before the uniform draw, so the
    # count floor(U[low, high] * N) is uniform over floor(low*N)..ceil(high*N)-1.
    N, B = 25, 4000
    g = torch.Generator().manual_seed(2)
    # 0.9 ± 0.5 -> U[0.4, 1.0]: counts uniform on 10..24 (mean 17), a fully masked grid
    # (ratio exactly 1.0) essentially never; without the upper clip, U[0.4, 1.4] masks
    # the whole grid in 40% of the images (mean count 20.2).
    counts = make_masks(torch.zeros(B, N), (5, 5), "rand", pred_ratio=0.9, pred_ratio_var=0.5,
                        masking_prob=1.0, generator=g).sum(1)
    assert counts.min() >= math.floor(0.4 * N) and counts.max() <= N
    assert (counts == N).float().mean() < 0.01
    assert counts.double().mean().item() == pytest.approx(17.0, abs=0.4)  # SE ~0.07
    # 0.1 ± 0.3 -> U[0, 0.4]: counts uniform on 0..9, so 10% of images have none masked;
    # without the lower clip, U[-0.2, 0.4] gives none masked for ratio < 0.04, i.e. 40%.
    counts = make_masks(torch.zeros(B, N), (5, 5), "rand", pred_ratio=0.1, pred_ratio_var=0.3,
                        masking_prob=1.0, generator=g).sum(1)
    assert counts.max() <= math.floor(0.4 * N) - 1
    assert (counts == 0).float().mean().item() == pytest.approx(0.1, abs=0.03)  # SE ~0.005


@pytest.mark.parametrize("pred_shape", PRED_SHAPES)
def test_masking_prob_zero_gives_empty_masks(pred_shape):
    torch.manual_seed(3)
    mask = make_masks(_attention(8, 49), (7, 7), pred_shape, pred_ratio=0.5, masking_prob=0.0)
    assert mask.shape == (8, 49)
    assert not mask.any()


@pytest.mark.parametrize("pred_shape", ["attmask_high", "attmask_hint", "rand"])
def test_masking_prob_half_masks_about_half_the_samples(pred_shape):
    torch.manual_seed(4)
    B, N = 1000, 16
    mask = make_masks(_attention(B, N), (4, 4), pred_shape, pred_ratio=0.5, masking_prob=0.5,
                      show_max=0.25, show_ratio=0.125)
    masked = mask.any(1)
    assert 400 < int(masked.sum()) < 600
    # the masked samples have their full count, the others none
    expected = 8 - (2 if pred_shape == "attmask_hint" else 0)
    assert set(mask.sum(1).tolist()) == {0, expected}


def test_masking_prob_draws_are_reproducible_with_generator():
    attn = _attention(32, 49)
    a = make_masks(attn, (7, 7), "rand", 0.3, 0.1, 0.5, generator=torch.Generator().manual_seed(7))
    b = make_masks(attn, (7, 7), "rand", 0.3, 0.1, 0.5, generator=torch.Generator().manual_seed(7))
    c = make_masks(attn, (7, 7), "rand", 0.3, 0.1, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _topk_mask(attn, k, largest):
    idx = attn.topk(k, dim=1, largest=largest).indices
    return torch.zeros_like(attn, dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.parametrize("pred_shape,largest", [("attmask_high", True), ("attmask_low", False)])
def test_attmask_high_low_select_extreme_tokens(pred_shape, largest):
    B, N = 5, 49
    attn = _attention(B, N, seed=5)
    mask = make_masks(attn, (7, 7), pred_shape, pred_ratio=0.3, masking_prob=1.0)
    k = math.floor(0.3 * N)
    assert torch.equal(mask, _topk_mask(attn, k, largest))
    # every masked token is attended more (high) / less (low) than every visible one
    for b in range(B):
        m, v = attn[b][mask[b]], attn[b][~mask[b]]
        assert (m.min() > v.max()) if largest else (m.max() < v.min())


def test_attmask_high_and_low_are_disjoint_at_small_ratio():
    attn = _attention(3, 36, seed=6)
    high = make_masks(attn, (6, 6), "attmask_high", 0.3, masking_prob=1.0)
    low = make_masks(attn, (6, 6), "attmask_low", 0.3, masking_prob=1.0)
    assert not (high & low).any()


def test_attmask_hint_reveals_tokens_among_the_top():
    torch.manual_seed(7)
    B, N = 6, 100
    attn = _attention(B, N, seed=7)
    show_max, show_ratio = 0.2, 0.1
    high = make_masks(attn, (10, 10), "attmask_high", pred_ratio=0.5, masking_prob=1.0)
    hint = make_masks(attn, (10, 10), "attmask_hint", pred_ratio=0.5, masking_prob=1.0,
                      show_max=show_max, show_ratio=show_ratio)
    top = _topk_mask(attn, int(show_max * N), True)
    assert not (hint & ~high).any()                 # hint masks a subset of the high mask
    revealed = high & ~hint
    assert revealed.sum(1).tolist() == [int(show_ratio * N)] * B
    assert not (revealed & ~top).any()              # revealed tokens are among the top show_max


def test_attmask_hint_reveal_is_random_between_calls():
    torch.manual_seed(8)
    attn = _attention(4, 100, seed=8)
    masks = [make_masks(attn, (10, 10), "attmask_hint", 0.5, masking_prob=1.0, show_max=0.3, show_ratio=0.1)
             for _ in range(3)]
    assert not (torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2]))


def test_rand_count_and_differs_between_calls():
    torch.manual_seed(9)
    attn = torch.zeros(4, 49)  # only gives B and N
    a = make_masks(attn, (7, 7), "rand", 0.4, masking_prob=1.0)
    b = make_masks(attn, (7, 7), "rand", 0.4, masking_prob=1.0)
    assert a.sum(1).tolist() == [19] * 4 and b.sum(1).tolist() == [19] * 4
    assert not torch.equal(a, b)
    # per sample, not one pattern repeated over the batch
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))


@pytest.mark.parametrize("grid,count", [((14, 14), 58), ((7, 7), 14), ((4, 6), 7), ((3, 3), 0)])
def test_block_mask_count(grid, count):
    random.seed(10)
    for _ in range(20):
        m = block_mask(grid, count)
        assert m.shape == (grid[0] * grid[1],) and m.dtype == torch.bool
        assert int(m.sum()) == count


def test_block_mask_never_exceeds_request():
    # Requests below the grid size, where a rounded rectangle can overshoot the
    # remaining budget: block_mask must reject such rectangles, never mask more.
    for seed in range(5):
        random.seed(seed)
        for count in (1, 2, 3, 5, 7, 10, 13, 17, 22, 29):
            for _ in range(10):
                assert int(block_mask((6, 6), count).sum()) <= count, (seed, count)


def test_block_masks_vary_and_are_blocky():
    random.seed(12)
    h, w = 14, 14
    masks = [block_mask((h, w), 58).view(h, w) for _ in range(10)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1

    def adjacent_pairs(m):
        return int((m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum())

    # rectangles of patches: many more masked neighbour pairs than a random 58-of-196 mask (~ 58*2*58/196 ≈ 34)
    mean_pairs = sum(adjacent_pairs(m) for m in masks) / len(masks)
    assert mean_pairs > 60


def test_attention_grid_mismatch_raises():
    with pytest.raises(ValueError):
        make_masks(torch.rand(2, 49), (7, 6), "attmask_high")


def test_unknown_pred_shape_raises():
    with pytest.raises(ValueError):
        make_masks(torch.rand(2, 49), (7, 7), "attmask_medium")
