"""Tests for simpool/pooling.py: SimPool against an independent float64 reading of the paper's equations."""

import math

import pytest
import torch

from simpool.pooling import SimPool

EPS = 1e-6


def _randomise(module, seed=0):
    """Give every parameter (LayerNorm affine, projections, beta) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 1 and p.numel() > 1 else 0.0)
            )
        if getattr(module, "beta", None) is not None:
            module.beta.fill_(0.37)
    return module


def _reference(module, x, num_heads, gamma, scale=None):
    """SimPool written out from the paper's equations, in float64, loop over heads.

    u0 = mean_n x_n; q = Wq u0 (+bq); k = Wk LN(x) (+bk); v = LN(x);
    a = softmax(q.k^T * scale) per head; u = a.v, or with gamma
    u = (a.(v - min_sample v + eps)^gamma)^(1/gamma); then + beta.
    """
    x = x.double()
    B, N, d = x.shape
    hd = d // num_heads
    scale = hd**-0.5 if scale is None else scale
    ln = module.norm_patches
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    xn = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()
    Wq, Wk = module.wq.weight.double(), module.wk.weight.double()
    q = x.mean(1) @ Wq.T
    k = xn @ Wk.T
    if module.wq.bias is not None:
        q = q + module.wq.bias.double()
        k = k + module.wk.bias.double()
    v = xn
    if gamma is not None:
        vmin = v.reshape(B, -1).min(dim=1).values.view(B, 1, 1)  # per sample, all tokens and channels
        v = v - vmin + EPS
    out = torch.empty(B, d, dtype=torch.float64)
    attn = torch.empty(B, num_heads, N, dtype=torch.float64)
    for b in range(B):
        for h in range(num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            logits = (k[b, :, sl] @ q[b, sl]) * scale  # (N,)
            a = torch.exp(logits - logits.max())
            a = a / a.sum()
            attn[b, h] = a
            if gamma is None:
                out[b, sl] = a @ v[b, :, sl]
            else:
                out[b, sl] = (a @ v[b, :, sl] ** gamma) ** (1.0 / gamma)
    if module.beta is not None:
        out = out + module.beta.double()
    return out, attn


# The module computes the softmax and pooling in float32 even for float64 input,
# so the comparison tolerance is float32-level.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("gamma", [None, 1.25, 3.0])
@pytest.mark.parametrize("use_beta", [False, True])
def test_matches_float64_reference(num_heads, gamma, use_beta):
    torch.manual_seed(1)
    d, N, B = 16, 9, 3
    m = _randomise(SimPool(d, num_heads=num_heads, gamma=gamma, use_beta=use_beta)).double()
    x = torch.randn(B, N, d, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3]).double().view(B, 1, 1)
    expected, expected_attn = _reference(m, x, num_heads, gamma)
    # the samples have different minima, so a batch-wide min would give a different answer
    if gamma is not None:
        ln_min = m.norm_patches(x).reshape(B, -1).min(1).values
        assert (ln_min.max() - ln_min.min()).item() > 0.1
    with torch.no_grad():
        out, attn = m(x, return_attention=True)
    assert out.shape == (B, d) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, **TOL)
    if num_heads == 1:
        assert attn.shape == (B, N)
        torch.testing.assert_close(attn.double(), expected_attn[:, 0], **TOL)
    else:
        assert attn.shape == (B, num_heads, N)
        torch.testing.assert_close(attn.double(), expected_attn, **TOL)


def test_qkv_bias_and_explicit_scale():
    torch.manual_seed(2)
    d, N, B = 8, 5, 2
    m = _randomise(SimPool(d, num_heads=2, qkv_bias=True, qk_scale=0.7, gamma=2.0), seed=3).double()
    assert m.wq.bias is not None and m.wk.bias is not None
    x = torch.randn(B, N, d, dtype=torch.float64)
    expected, _ = _reference(m, x, 2, 2.0, scale=0.7)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, **TOL)


def test_gamma_one_equals_plain_attention_pooling_plus_shift():
    # With gamma=1 the generalised mean is a.(v - min + eps) = a.v - min + eps (a sums to 1).
    torch.manual_seed(3)
    d, N, B = 8, 6, 2
    plain = _randomise(SimPool(d)).double()
    gm = SimPool(d, gamma=1.0).double()
    gm.load_state_dict(plain.state_dict())
    x = torch.randn(B, N, d, dtype=torch.float64)
    with torch.no_grad():
        vmin = plain.norm_patches(x).reshape(B, -1).min(1).values[:, None]
        torch.testing.assert_close(gm(x), plain(x) - vmin + EPS, **TOL)


@pytest.mark.parametrize("gamma", [None, 1.25])
def test_sample_independent_of_batch_mates(gamma):
    torch.manual_seed(4)
    d, N = 12, 7
    m = _randomise(SimPool(d, gamma=gamma)).double()
    a = torch.randn(1, N, d, dtype=torch.float64)
    mate1 = torch.randn(1, N, d, dtype=torch.float64)
    mate2 = torch.randn(1, N, d, dtype=torch.float64)
    mate2[0, 0, 0] = -200.0  # one extreme outlier: its normalised tokens reach a far lower minimum
    with torch.no_grad():
        mins = [m.norm_patches(t).min().item() for t in (a, mate1, mate2)]
        assert min(mins) < mins[0] - 0.5  # a batch-wide minimum would change sample 0's shift
        alone = m(a)
        with1 = m(torch.cat([a, mate1]))
        with2 = m(torch.cat([mate2, a, mate1]))
    torch.testing.assert_close(with1[0:1], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with2[1:2], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_batch_of_one(gamma):
    m = SimPool(10, gamma=gamma)
    out, attn = m(torch.randn(1, 4, 10), return_attention=True)
    assert out.shape == (1, 10)
    assert attn.shape == (1, 4)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_feature_map_input_equals_token_input(num_heads):
    torch.manual_seed(5)
    B, d, H, W = 2, 8, 3, 4
    m = _randomise(SimPool(d, num_heads=num_heads, gamma=1.5)).double()
    fmap = torch.randn(B, d, H, W, dtype=torch.float64)
    tokens = torch.empty(B, H * W, d, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            tokens[:, i * W + j, :] = fmap[:, :, i, j]  # row-major token order
    with torch.no_grad():
        out4, attn4 = m(fmap, return_attention=True)
        out3, attn3 = m(tokens, return_attention=True)
    torch.testing.assert_close(out4, out3, rtol=0, atol=1e-12)
    torch.testing.assert_close(attn4, attn3, rtol=0, atol=1e-12)
    # the map is in token order: weight of pixel (i, j) at index i*W + j
    expected, expected_attn = _reference(m, tokens, num_heads, 1.5)
    torch.testing.assert_close(out4, expected, **TOL)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_map_is_a_distribution(num_heads):
    torch.manual_seed(6)
    B, N, d = 3, 11, 16
    m = _randomise(SimPool(d, num_heads=num_heads))
    _, attn = m(torch.randn(B, N, d), return_attention=True)
    shape = (B, N) if num_heads == 1 else (B, num_heads, N)
    assert attn.shape == shape
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=1e-5)
    # not uniform: the query actually selects tokens
    assert attn.std(-1).min() > 1e-4


def test_finite_under_bf16_autocast_with_gamma():
    torch.manual_seed(7)
    m = _randomise(SimPool(32, gamma=1.25, use_beta=True))
    x = torch.randn(2, 49, 32) * 5
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x, return_attention=True)
    assert out.shape == (2, 32)
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    torch.testing.assert_close(attn.float().sum(-1), torch.ones(2), rtol=0, atol=1e-3)
    # bf16 projections: a loose agreement with the fp32 result
    assert (out.float() - ref).abs().max() < 0.2 * ref.abs().max()


@pytest.mark.parametrize("gamma", [None, 1.25])
def test_logits_and_pooling_in_fp32_under_bf16_autocast(gamma):
    # The projections run in bf16 under autocast; from their outputs on, the map (which AttMask
    # ranks) and the pooled vector must be fp32-exact, not rounded through bf16 products.
    torch.manual_seed(8)
    B, N, d = 2, 196, 64
    m = _randomise(SimPool(d, gamma=gamma))
    seen = {}
    m.wq.register_forward_hook(lambda mod, inp, out: seen.__setitem__("q", out))
    m.wk.register_forward_hook(lambda mod, inp, out: seen.__setitem__("k", out))
    m.norm_patches.register_forward_hook(lambda mod, inp, out: seen.__setitem__("v", out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(torch.randn(B, N, d) * 3, return_attention=True)
    assert seen["q"].dtype == torch.bfloat16  # the projections did run in bf16
    q, k, v = (seen[key].double() for key in ("q", "k", "v"))
    expected_attn = ((k @ q.unsqueeze(-1)).squeeze(-1) * d**-0.5).softmax(-1)
    if gamma is not None:
        v = v - v.reshape(B, -1).min(1).values.view(B, 1, 1) + EPS
        expected = (expected_attn.unsqueeze(1) @ v**gamma).squeeze(1) ** (1 / gamma)
    else:
        expected = (expected_attn.unsqueeze(1) @ v).squeeze(1)
    assert attn.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(attn.double(), expected_attn, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_beta", [False, True])
def test_state_dict_keys_match_official_names(use_beta):
    m = SimPool(8, gamma=1.25, use_beta=use_beta)
    expected = {"norm_patches.weight", "norm_patches.bias", "wq.weight", "wk.weight"}
    if use_beta:
        expected.add("beta")
    assert set(m.state_dict()) == expected


@pytest.mark.parametrize("shape", [(4, 8), (8,), (1, 2, 8, 3, 3)])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError):
        SimPool(8)(torch.randn(*shape))


def test_dim_not_divisible_by_heads_raises():
    with pytest.raises(ValueError):
        SimPool(10, num_heads=4)


def test_default_scale_uses_head_dim():
    m = SimPool(64, num_heads=4)
    assert math.isclose(m.scale, 16**-0.5)
