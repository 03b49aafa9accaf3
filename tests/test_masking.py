"""Tests for simpool/masking.py: AttMask high/low/hint, random and block masks, with the
semantics of AttMask's attmask.py / main_attmask.py and iBOT's loader.py."""

import math
import random

import numpy as np
import pytest
import torch

from simpool.masking import PRED_SHAPES, block_mask, draw_pred_ratios, make_masks

ATTMASK = ("attmask_high", "attmask_low", "attmask_hint")


def _attention(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g).softmax(-1)  # distinct values, no ties


def _topk_mask(attn, k, largest):
    idx = attn.topk(k, dim=1, largest=largest).indices
    return torch.zeros_like(attn, dtype=torch.bool).scatter_(1, idx, True)


# ---------------------------------------------------------------- counts and ratio draws


@pytest.mark.parametrize("pred_shape", ["attmask_high", "attmask_low", "attmask_hint", "rand"])
@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.3), ((14, 14), 0.5), ((4, 6), 0.25), ((5, 5), 0.1)])
def test_requested_counts_with_masking_prob_one(pred_shape, grid, ratio):
    torch.manual_seed(0)
    N = grid[0] * grid[1]
    mask = make_masks(
        _attention(6, N),
        grid,
        pred_shape,
        pred_ratio=ratio,
        pred_ratio_var=0.0,
        masking_prob=1.0,
        show_max=0.1,
        show_ratio=0.0,
    )
    assert mask.shape == (6, N) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [int(ratio * N)] * 6


def test_attmask_draws_one_ratio_per_batch():
    # main_attmask.py: "For each sample in the batch we perform the same masking ratio"
    g = torch.Generator().manual_seed(1)
    N, counts = 100, set()
    for _ in range(30):
        for shape in ATTMASK:
            mask = make_masks(
                _attention(32, N), (10, 10), shape, 0.3, 0.2, masking_prob=1.0, show_ratio=0.0, generator=g
            )
            per_crop = set(mask.sum(1).tolist())
            assert len(per_crop) == 1, shape
            counts |= per_crop
    assert min(counts) >= int(0.1 * N) and max(counts) <= int(0.5 * N)
    assert len(counts) >= 15


@pytest.mark.parametrize("pred_shape", ["rand", "block"])
def test_rand_and_block_draw_a_ratio_per_crop(pred_shape):
    random.seed(1)
    g = torch.Generator().manual_seed(1)
    B, N = 64, 100
    counts = make_masks(torch.zeros(B, N), (10, 10), pred_shape, 0.3, 0.2, masking_prob=1.0, generator=g).sum(1)
    assert counts.max() <= int(0.5 * N)
    assert len(set(counts.tolist())) >= 10
    assert counts.min() < 20 and counts.max() > 40
    if pred_shape == "rand":
        assert counts.min() >= int(0.1 * N)


def test_draw_pred_ratios_scalar_and_list():
    g = torch.Generator().manual_seed(2)
    assert draw_pred_ratios(0.3, 0.0, 5, g) == [0.3] * 5
    assert draw_pred_ratios([0.3], [0.0], 3, g) == [0.3] * 3  # one-element lists are their element
    r = torch.tensor(draw_pred_ratios(0.3, 0.2, 4000, g))
    assert r.min() >= 0.1 and r.max() <= 0.5
    assert r.mean().item() == pytest.approx(0.3, abs=0.01)  # SE ~0.002
    # iBOT's recipe: half no masking, half 0.3 +- 0.2
    r = torch.tensor(draw_pred_ratios([0, 0.3], [0, 0.2], 4000, g))
    zero = r == 0
    assert zero.float().mean().item() == pytest.approx(0.5, abs=0.05)  # SE ~0.008
    assert r[~zero].min() >= 0.1 and r[~zero].max() <= 0.5
    # a scalar var is repeated for every ratio
    r = torch.tensor(draw_pred_ratios([0.1, 0.6], 0.05, 4000, g))
    low = r < 0.35
    assert r[low].min() >= 0.05 and r[low].max() <= 0.15 and r[~low].min() >= 0.55 and r[~low].max() <= 0.65
    assert low.float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_list_pred_ratio_masks_nothing_in_about_half_the_draws():
    g = torch.Generator().manual_seed(3)
    N = 196
    # attmask: one ratio per call, so a call masks either nothing or int(0.3 * N) in every crop
    calls = [
        make_masks(_attention(4, N, seed=i), (14, 14), "attmask_high", [0, 0.3], [0, 0], masking_prob=1.0, generator=g)
        .sum(1)
        .tolist()
        for i in range(400)
    ]
    assert all(c in ([0] * 4, [58] * 4) for c in calls)
    assert sum(c[0] == 0 for c in calls) / 400 == pytest.approx(0.5, abs=0.1)
    # rand: a ratio per crop
    counts = make_masks(torch.zeros(2000, N), (14, 14), "rand", [0, 0.3], [0, 0], generator=g).sum(1)
    assert set(counts.tolist()) == {0, 58}
    assert (counts == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_one_element_lists_equal_scalars():
    attn = _attention(8, 49)
    for shape in PRED_SHAPES:
        random.seed(4)
        a = make_masks(attn, (7, 7), shape, [0.3], [0.1], generator=torch.Generator().manual_seed(4))
        random.seed(4)
        b = make_masks(attn, (7, 7), shape, 0.3, 0.1, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b), shape


@pytest.mark.parametrize(
    "ratio,var,message",
    [
        (0.3, 0.4, "pred_ratio_var 0.4 exceeds pred_ratio 0.3: the ratio would go below 0"),
        ([0, 0.3], [0.1, 0.2], "pred_ratio_var 0.1 exceeds pred_ratio 0.0"),
        (0.9, 0.2, "exceeds 1"),
        ([0.1, 0.2, 0.3], [0.1, 0.1], "pred_ratio has 3 values but pred_ratio_var has 2"),
        (0.3, [0.1, 0.1], "pred_ratio has 1 values but pred_ratio_var has 2"),
        (-0.1, 0.0, "must be >= 0"),
        ([], 0.0, "must not be empty"),
    ],
)
def test_bad_ratios_raise(ratio, var, message):
    with pytest.raises(ValueError, match=message):
        make_masks(_attention(2, 49), (7, 7), "attmask_high", ratio, var)
    with pytest.raises(ValueError, match=message):
        draw_pred_ratios(ratio, var, 1)


def test_full_range_ratio_is_allowed():
    g = torch.Generator().manual_seed(5)
    counts = make_masks(torch.zeros(500, 25), (5, 5), "rand", 0.5, 0.5, generator=g).sum(1)
    assert counts.min() >= 0 and counts.max() <= 25 and counts.float().std() > 5


# ---------------------------------------------------------------- masking_prob


@pytest.mark.parametrize("pred_shape", ATTMASK)
def test_masking_prob_zero_gives_empty_attmask_masks(pred_shape):
    torch.manual_seed(3)
    mask = make_masks(_attention(8, 49), (7, 7), pred_shape, pred_ratio=0.5, masking_prob=0.0)
    assert mask.shape == (8, 49)
    assert not mask.any()


@pytest.mark.parametrize("pred_shape", ["rand", "block"])
def test_rand_and_block_ignore_masking_prob(pred_shape):
    # AttMask: masking_prob "works only for --pred_shape attmask_high, attmask_hint, attmask_low"
    random.seed(6)
    torch.manual_seed(6)
    mask = make_masks(torch.zeros(32, 196), (14, 14), pred_shape, pred_ratio=0.3, masking_prob=0.0)
    assert mask.any(1).all()
    if pred_shape == "rand":
        assert mask.sum(1).tolist() == [58] * 32


@pytest.mark.parametrize("pred_shape", ATTMASK)
def test_masking_prob_half_masks_about_half_the_samples(pred_shape):
    torch.manual_seed(4)
    B, N = 1000, 16
    mask = make_masks(
        _attention(B, N), (4, 4), pred_shape, pred_ratio=0.5, masking_prob=0.5, show_max=0.25, show_ratio=0.125
    )
    masked = mask.any(1)
    assert 400 < int(masked.sum()) < 600
    # the masked samples have their full count, the others none
    expected = 8 - (2 if pred_shape == "attmask_hint" else 0)
    assert set(mask.sum(1).tolist()) == {0, expected}


@pytest.mark.parametrize("pred_shape", PRED_SHAPES)
def test_masks_are_reproducible_with_generator(pred_shape):
    attn = _attention(32, 49)

    def masks(seed, global_seed):
        torch.manual_seed(global_seed)  # the global RNGs must not matter (block: its rectangles use random)
        random.seed(0)
        return make_masks(attn, (7, 7), pred_shape, [0.2, 0.4], 0.1, 0.5, generator=torch.Generator().manual_seed(seed))

    a, b, c = masks(7, 0), masks(7, 1), masks(8, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- AttMask high / low / hint


@pytest.mark.parametrize("pred_shape,largest", [("attmask_high", True), ("attmask_low", False)])
def test_attmask_high_low_select_extreme_tokens(pred_shape, largest):
    B, N = 5, 49
    attn = _attention(B, N, seed=5)
    mask = make_masks(attn, (7, 7), pred_shape, pred_ratio=0.3, masking_prob=1.0)
    k = int(0.3 * N)
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


def test_attmask_hint_explicit_show_ratio_reveals_tokens_among_the_top():
    torch.manual_seed(7)
    B, N = 6, 100
    attn = _attention(B, N, seed=7)
    show_max, show_ratio = 0.2, 0.1
    high = make_masks(attn, (10, 10), "attmask_high", pred_ratio=0.5, masking_prob=1.0)
    hint = make_masks(
        attn, (10, 10), "attmask_hint", pred_ratio=0.5, masking_prob=1.0, show_max=show_max, show_ratio=show_ratio
    )
    top = _topk_mask(attn, int(show_max * N), True)
    assert not (hint & ~high).any()  # hint masks a subset of the high mask
    revealed = high & ~hint
    assert revealed.sum(1).tolist() == [int(show_ratio * N)] * B
    assert not (revealed & ~top).any()  # revealed tokens are among the top show_max


def test_attmask_hint_never_reveals_more_than_the_top():
    attn = _attention(4, 100, seed=9)
    hint = make_masks(attn, (10, 10), "attmask_hint", 0.5, masking_prob=1.0, show_max=0.05, show_ratio=0.3)
    assert hint.sum(1).tolist() == [50 - 5] * 4
    assert not (hint & _topk_mask(attn, 5, True)).any()


def test_attmask_hint_default_follows_attmask_reveal_rule():
    # AttMask: reveal int(show_max * ratio2 * N) of the top int(show_max * N), not all of them.
    # N = 196, ratio 0.3: 58 masked, top 19, int(0.1 * 0.3 * 196) = 5 revealed -> 53 masked.
    g = torch.Generator().manual_seed(10)
    B, N, calls = 64, 196, 50
    attn = _attention(B, N, seed=10)
    high = _topk_mask(attn, 58, True)
    top = _topk_mask(attn, 19, True)
    times_revealed = torch.zeros(B, N)
    for _ in range(calls):
        hint = make_masks(attn, (14, 14), "attmask_hint", 0.3, 0.0, masking_prob=1.0, show_max=0.1, generator=g)
        assert hint.sum(1).tolist() == [53] * B
        assert not (hint & ~high).any()
        revealed = high & ~hint
        assert not (revealed & ~top).any()
        assert (hint & top).sum(1).tolist() == [14] * B  # some top tokens stay masked
        times_revealed += revealed
    # uniform among the top 19: each revealed with probability 5/19 (SE ~0.008 over 3200 draws)
    freq = times_revealed[top].view(B, 19).sum(0) / (B * calls)
    assert (freq - 5 / 19).abs().max() < 0.05


def test_attmask_hint_recipe_reveals_a_second_ratio_draw():
    # README's AttMask-Hint recipe: --pred_ratio 0.3 --pred_ratio_var 0.2 --masking_prob 0.5 --show_max 0.1.
    # With the same generator the hint call draws the same first ratio and coin flips as the
    # high call, then a second ratio r2 in [0.1, 0.5]: int(0.1 * r2 * 196) in 1..9 tokens revealed.
    B, N = 32, 196
    reveals = []
    for seed in range(60):
        attn = _attention(B, N, seed=seed)
        kw = dict(pred_ratio=0.3, pred_ratio_var=0.2, masking_prob=0.5, show_max=0.1)
        high = make_masks(attn, (14, 14), "attmask_high", generator=torch.Generator().manual_seed(seed), **kw)
        hint = make_masks(attn, (14, 14), "attmask_hint", generator=torch.Generator().manual_seed(seed), **kw)
        assert not (hint & ~high).any()
        revealed = (high & ~hint).sum(1)
        masked = high.any(1)
        assert (revealed[~masked] == 0).all()
        assert len(set(revealed[masked].tolist())) <= 1  # one second ratio for the whole batch
        assert len(set(hint[masked].sum(1).tolist())) <= 1
        assert not ((high & ~hint) & ~_topk_mask(attn, 19, True)).any()
        reveals += revealed[masked][:1].tolist()
    assert min(reveals) >= 1 and max(reveals) <= 9
    assert len(set(reveals)) >= 5
    # mean of int(19.6 * U[0.1, 0.5]) is about 5.4 (the old rule revealed all 19)
    assert 4 < sum(reveals) / len(reveals) < 7


def test_attmask_hint_reveal_is_random_between_calls():
    torch.manual_seed(8)
    attn = _attention(4, 100, seed=8)
    masks = [
        make_masks(attn, (10, 10), "attmask_hint", 0.5, masking_prob=1.0, show_max=0.3, show_ratio=0.1)
        for _ in range(3)
    ]
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


def test_rand_positions_are_uniform():
    g = torch.Generator().manual_seed(11)
    freq = make_masks(torch.zeros(4000, 25), (5, 5), "rand", 0.2, generator=g).float().mean(0)
    assert (freq - 5 / 25).abs().max() < 0.03  # SE ~0.006


# ---------------------------------------------------------------- block (iBOT's loader)


def _reference_block(H, W, high, rng):
    """iBOT's loader.py block loop, written out plainly (numpy + loops) as the reference."""
    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _attempt in range(10):
            low = (min(H, W) // 3) ** 2
            target_area = rng.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top = rng.randint(0, H - h)
                left = rng.randint(0, W - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask.reshape(-1)


@pytest.mark.parametrize(
    "grid,ratios",
    [
        ((14, 14), (0.1, 0.3, 0.3 + 0.2 * 0.37, 0.5)),
        ((7, 7), (0.3, 0.45)),
        ((4, 6), (0.25, 0.6)),
        ((3, 3), (0.0, 0.3, 1.0)),
        ((1, 8), (0.5,)),
    ],
)
def test_block_mask_equals_the_reference_loop(grid, ratios):
    H, W = grid
    for ratio in ratios:
        high = ratio * H * W
        for seed in range(60):
            random.seed(seed)
            ours = block_mask(grid, high)
            ref = _reference_block(H, W, high, random.Random(seed))
            assert np.array_equal(ours.numpy(), ref), (grid, ratio, seed)
            rng = random.Random(seed)
            assert np.array_equal(block_mask(grid, high, rng=rng).numpy(), ref)


def test_make_masks_block_equals_the_reference_per_crop():
    # make_masks draws a ratio per crop (torch generator), then one block mask per crop with
    # high = ratio * H * W from Python's random, crop after crop.
    B, H, W = 16, 14, 14
    random.seed(12)
    ours = make_masks(
        torch.zeros(B, H * W), (H, W), "block", [0, 0.3], [0, 0.2], generator=torch.Generator().manual_seed(12)
    )
    ratios = draw_pred_ratios([0, 0.3], [0, 0.2], B, torch.Generator().manual_seed(12))
    rng = random.Random(12)
    ref = np.stack([_reference_block(H, W, r * H * W, rng) for r in ratios])
    assert np.array_equal(ours.numpy(), ref)
    assert (ours.sum(1) == 0).any() and (ours.sum(1) > 0).any()


def test_block_mask_count_never_exceeds_the_target():
    for seed in range(5):
        random.seed(seed)
        for grid in ((6, 6), (14, 14), (4, 6)):
            n = grid[0] * grid[1]
            for ratio in (0.03, 0.1, 0.2, 0.3, 0.45, 0.5, 0.8, 1.0):
                for _ in range(5):
                    m = block_mask(grid, ratio * n)
                    assert m.shape == (n,) and m.dtype == torch.bool
                    assert int(m.sum()) <= ratio * n, (seed, grid, ratio)


def test_block_mask_zero_target_and_typical_count():
    random.seed(13)
    assert not block_mask((14, 14), 0.0).any()
    counts = [int(block_mask((14, 14), 0.3 * 196).sum()) for _ in range(200)]
    assert max(counts) <= 58 and sum(counts) / len(counts) > 45


def test_block_rectangles_fit_strictly_inside_the_grid():
    # iBOT accepts a rectangle only if h < H and w < W: no rectangle spans a full side.
    class Recorder(random.Random):
        bounds = []

        def randint(self, a, b):
            self.bounds.append(b)
            return super().randint(a, b)

    rng = Recorder(14)
    for _ in range(200):
        block_mask((4, 4), 16.0, rng=rng)
        block_mask((5, 3), 9.0, rng=rng)
    assert Recorder.bounds and min(Recorder.bounds) >= 1  # top <= H - h with h <= H - 1, same for w
    # a grid one patch high can take no rectangle at all
    random.seed(14)
    assert not any(block_mask((1, 8), 4.0).any() for _ in range(20))


def test_block_masks_vary_and_are_blocky():
    random.seed(12)
    h, w = 14, 14
    masks = [block_mask((h, w), 58.8).view(h, w) for _ in range(10)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1

    def adjacent_pairs(m):
        return int((m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum())

    # rectangles of patches: many more masked neighbour pairs than a random 58-of-196 mask (~ 58*2*58/196 ≈ 34)
    mean_pairs = sum(adjacent_pairs(m) for m in masks) / len(masks)
    assert mean_pairs > 60


# ---------------------------------------------------------------- argument checks


def test_attention_grid_mismatch_raises():
    with pytest.raises(ValueError):
        make_masks(torch.rand(2, 49), (7, 6), "attmask_high")


def test_unknown_pred_shape_raises():
    with pytest.raises(ValueError):
        make_masks(torch.rand(2, 49), (7, 7), "attmask_medium")


@pytest.mark.parametrize("kw", [dict(masking_prob=1.5), dict(show_max=-0.1), dict(show_ratio=2.0)])
def test_out_of_range_probabilities_raise(kw):
    with pytest.raises(ValueError):
        make_masks(torch.rand(2, 49), (7, 7), "attmask_hint", **kw)
