"""Tests for vision_transformer.py: [CLS]-free SimPool ViT, attention layers and the DINO/iBOT heads."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from simpool import vision_transformer
from simpool.vision_transformer import (
    ARCHS,
    DINOHead,
    FusedAttention,
    SkippingBlock,
    VisionTransformer,
    WeightNormLinear,
    build_vit,
    cls_attention,
    embed_patches,
    vit_nano,
    vit_small,
    vit_tiny,
)


def _vit(mode="simpool", patch_size=4, img_size=16, embed_dim=24, depth=2, num_heads=3, **kw):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mode=mode, **kw
    ).eval()


def _randomise_(module, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("mode", ["simpool", "official"])
@pytest.mark.parametrize("patch_size,img_size,other", [(4, 16, (24, 20)), (16, 32, (64, 48))])
def test_output_shapes_at_two_sizes(mode, patch_size, img_size, other):
    model = _vit(mode, patch_size, img_size, gamma=1.25 if mode == "simpool" else None)
    for H, W in ((img_size, img_size), other):
        N = (H // patch_size) * (W // patch_size)
        with torch.no_grad():
            out = model.forward_features(torch.randn(2, 3, H, W), return_attention=True)
            pooled = model(torch.randn(2, 3, H, W))
        assert out["pooled"].shape == (2, 24) and pooled.shape == (2, 24)
        assert out["patch_tokens"].shape == (2, N, 24)
        assert out["attention"].shape == (2, N)
        assert all(torch.isfinite(out[k]).all() for k in ("pooled", "patch_tokens", "attention"))
        if mode == "simpool":
            torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2))
        else:  # the [CLS] row without its self weight
            assert (out["attention"].sum(-1) < 1).all()
    assert model.grid_size(*other) == (other[0] // patch_size, other[1] // patch_size)


def test_no_attention_unless_requested():
    out = _vit().forward_features(torch.randn(1, 3, 16, 16))
    assert out["attention"] is None


def test_pos_embed_is_interpolated_for_other_sizes():
    model = _vit("simpool", 4, 16)
    bias = model.patch_embed.proj.bias.detach()  # patch embedding of a zero image
    with torch.no_grad():
        model.pos_embed.normal_()
        small = model.prepare_tokens(torch.zeros(1, 3, 16, 16))[0] - bias
        torch.testing.assert_close(small, model.pos_embed[0])  # native size: used as is
        # a position code that depends on the row only (4x4 grid, row r has value r)
        rows = torch.arange(4.0).repeat_interleave(4)
        model.pos_embed.copy_(rows.view(1, 16, 1).expand(1, 16, 24))
        big = model.prepare_tokens(torch.zeros(1, 3, 32, 24))[0] - bias  # 8x6 grid
    assert big.shape == (48, 24)
    grid = big[:, 0].view(8, 6)
    torch.testing.assert_close(grid, grid[:, :1].expand(8, 6), rtol=0, atol=1e-5)  # still constant along a row
    assert grid[0, 0] < 0.5 and grid[-1, 0] > 2.5  # spans the original rows 0..3
    assert (grid[1:, 0] - grid[:-1, 0] > -1e-3).all() and grid[4, 0] > grid[3, 0]


# ---------------------------------------------------------------- masking
def test_masked_patches_take_the_mask_token():
    model = _randomise_(_vit())
    with torch.no_grad():
        model.masked_embed.normal_()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, 15] = True
    with torch.no_grad():
        tokens = model.prepare_tokens(x, mask.view(2, 4, 4))
        plain = model.patch_embed(x) + model.pos_embed
    torch.testing.assert_close(tokens[~mask], plain[~mask])
    expected_masked = (model.masked_embed + model.pos_embed[0])[mask.nonzero()[:, 1]]
    torch.testing.assert_close(tokens[mask], expected_masked)


@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_fully_masked_images_are_indistinguishable(mode):
    model = _randomise_(_vit(mode))
    mask = torch.ones(2, 16, dtype=torch.bool)
    a, b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16) * 3
    with torch.no_grad():
        out_a = model.forward_features(a, mask)
        out_b = model.forward_features(b, mask)
        out_plain = model.forward_features(a)
    torch.testing.assert_close(out_a["pooled"], out_b["pooled"])
    torch.testing.assert_close(out_a["patch_tokens"], out_b["patch_tokens"])
    assert not torch.allclose(out_a["pooled"], out_plain["pooled"], atol=1e-3)


# ---------------------------------------------------------------- names / builders
def test_state_dict_names():
    keys = set(_vit("simpool", gamma=1.25, use_beta=True).state_dict())
    for k in (
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.0.norm1.weight",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
        "norm.bias",
        "pos_embed",
        "simpool.wq.weight",
        "simpool.wk.weight",
        "simpool.norm_patches.weight",
        "simpool.beta",
        "masked_embed",
    ):
        assert k in keys, k
    assert not any("cls_token" in k for k in keys)
    official = set(_vit("official").state_dict())
    assert "cls_token" in official and not any(k.startswith("simpool.") for k in official)
    assert _vit("official").pos_embed.shape == (1, 17, 24)
    assert _vit("simpool").pos_embed.shape == (1, 16, 24)


def test_builders(monkeypatch):
    m = vit_nano(patch_size=16, img_size=32, gamma=2.0)
    dim, depth, heads = ARCHS["vit_nano"]
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (dim, depth, heads) == (192, 6, 3)
    assert m.simpool.gamma == 2.0 and m.patch_size == 16
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    # structure only: skip the (slow) truncated-normal initialisation of the bigger models
    monkeypatch.setattr(vision_transformer, "_init_weights", lambda m: None)
    monkeypatch.setattr(vision_transformer, "trunc_normal_", lambda t, **kw: t)
    tiny = vit_tiny(patch_size=16, img_size=32)
    small = build_vit("vit_small", patch_size=8, img_size=16, mode="official")
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].attn.num_heads) == (192, 12, 3)
    assert isinstance(small, VisionTransformer) and small.mode == "official" and small.simpool is None
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 12, 6)
    assert small.pos_embed.shape == (1, 5, 384)
    assert vit_small.__name__ == "vit_small"
    with pytest.raises(ValueError):
        build_vit("vit_giant")
    with pytest.raises(ValueError):
        VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3, mode="cls")


# ---------------------------------------------------------------- patch embedding, stochastic depth
@pytest.mark.parametrize("size", [(16, 16), (18, 23)])  # 18 x 23: the last partial patches are dropped
def test_embed_patches_is_the_strided_convolution(size):
    model = _randomise_(_vit()).double()
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    conv = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    out = embed_patches(model.patch_embed.proj, x)
    assert out.is_contiguous() and out.shape == (3, (size[0] // 4) * (size[1] // 4), 24)
    torch.testing.assert_close(out, conv, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the product in bf16
        low = embed_patches(model.float().patch_embed.proj, x.float())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), conv, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("autocast", [False, True])
def test_skipping_block_equals_timm_drop_path(autocast):
    """Same draws, outputs and gradients as timm's Block with DropPath, while the dropped
    samples never enter the branch."""
    torch.manual_seed(0)
    kw = dict(
        dim=24, num_heads=3, drop_path=0.5, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), attn_layer=FusedAttention
    )
    fast = _randomise_(SkippingBlock(**kw), std=0.2).train()
    dense = Block(**kw).train()
    dense.load_state_dict(fast.state_dict())
    branch_batches = []
    fast.norm1.register_forward_hook(lambda m, i, o: branch_batches.append(i[0].shape[0]))
    x = torch.randn(16, 5, 24)
    outs, grads = [], []
    for block in (fast, dense):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(xi)
        (y.float() * torch.linspace(-1, 1, 24)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    assert 0 < branch_batches[0] < 16  # some samples dropped, and they skipped the branch
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dropped = (outs[1] == x).all(-1).all(-1)  # dropped in both branches: the input passes through
    torch.testing.assert_close(outs[0][dropped], x[dropped], rtol=0, atol=0)
    fast.eval()  # eval mode: no drop path, every sample through both branches
    branch_batches.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dense.eval()(x))
    assert branch_batches == [16]


# ---------------------------------------------------------------- pooled vector recomputed by hand
def _manual_patch_embed(model, x):
    """Conv with stride = kernel = p, written as a matmul over flattened p x p patches."""
    p = model.patch_size
    B, C, H, W = x.shape
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)
    w = model.patch_embed.proj.weight.reshape(model.embed_dim, -1)
    return patches @ w.T + model.patch_embed.proj.bias


@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_pooled_vector_recomputed(mode):
    model = _randomise_(_vit(mode, gamma=1.25 if mode == "simpool" else None)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_features(x, return_attention=True)
        t = _manual_patch_embed(model, x)
        if mode == "official":
            t = torch.cat([model.cls_token.expand(2, -1, -1), t], dim=1)
        t = t + model.pos_embed
        for blk in model.blocks:
            t = blk(t)
        patches = t[:, 1:] if mode == "official" else t
        if mode == "simpool":
            pooled, attn = model.simpool(patches, return_attention=True)
            torch.testing.assert_close(out["attention"], attn)
        else:
            pooled = t[:, 0]
        expected = model.norm(pooled)
    torch.testing.assert_close(out["pooled"], expected)
    torch.testing.assert_close(out["patch_tokens"], model.norm(patches))
    # final norm really is applied: unit-variance rows before the affine part
    raw = (out["pooled"] - model.norm.bias) / model.norm.weight
    torch.testing.assert_close(raw.var(-1, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- attention
def _manual_attention(x, attn):
    """Full multi-head softmax attention in float64; returns (output, weights (B, h, T, T))."""
    x = x.double()
    B, T, C = x.shape
    h = attn.num_heads
    hd = C // h
    qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.reshape(B, T, 3, h, hd).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / hd**0.5
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double(), weights


def test_fused_attention_matches_manual_softmax():
    torch.manual_seed(2)
    attn = _randomise_(FusedAttention(12, num_heads=3, qkv_bias=True), std=0.2).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    expected, _ = _manual_attention(x, attn)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)
        # bf16 autocast on CPU runs the kernel in fp32: finite and close to the exact result
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn.float()(x.float())
    assert torch.isfinite(low).all()
    assert (low.double() - expected).abs().max() < 0.05 * expected.abs().max() + 0.02


def test_cls_attention_is_cls_row_averaged_over_heads():
    model = _randomise_(_vit("official"), std=0.3).double()
    block = model.blocks[0]
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    with torch.no_grad():
        _, weights = _manual_attention(block.norm1(x), block.attn)
        got = cls_attention(block, x)
    expected = weights[:, :, 0, 1:].mean(1)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_cls_attention_logits_in_fp32_under_bf16_autocast():
    # The qkv projection runs in bf16 under autocast; the logits from its output must not be
    # rounded to bf16 (ties and swaps in the ranking that AttMask masks by).
    torch.manual_seed(0)
    model = _randomise_(_vit("official"), std=0.3)
    block = model.blocks[0]
    x = torch.randn(2, 65, 24)
    seen = {}
    block.attn.qkv.register_forward_hook(lambda mod, inp, out: seen.__setitem__("qkv", out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cls_attention(block, x, average_heads=False)
    assert seen["qkv"].dtype == torch.bfloat16
    h = block.attn.num_heads
    qkv = seen["qkv"].double().reshape(2, 65, 3, h, -1)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    expected = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(-1)[:, :, 0, 1:]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_official_attention_is_last_block_cls_row():
    model = _randomise_(_vit("official"), std=0.3).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_features(x, return_attention=True)
        t = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            t = blk(t)
        _, weights = _manual_attention(model.blocks[-1].norm1(t), model.blocks[-1].attn)
    torch.testing.assert_close(out["attention"].double(), weights[:, :, 0, 1:].mean(1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- heads
def test_weight_norm_linear_formula():
    torch.manual_seed(3)
    layer = WeightNormLinear(5, 4).double()
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[0.5], [2.0], [-1.0], [3.0]]))
    x = torch.randn(6, 5, dtype=torch.float64)
    v, g = layer.weight_v.detach(), layer.weight_g.detach()
    expected = torch.stack([x @ (g[i, 0] * v[i] / torch.sqrt((v[i] ** 2).sum())) for i in range(4)], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert set(layer.state_dict()) == {"weight_g", "weight_v"}
    assert layer.weight_v.shape == (4, 5) and layer.weight_g.shape == (4, 1)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_norm_last_layer(norm_last_layer):
    torch.manual_seed(4)
    head = DINOHead(8, 6, norm_last_layer=norm_last_layer, hidden_dim=16, bottleneck_dim=4, patch_out_dim=5)
    assert head.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert head.last_layer2.weight_g.requires_grad is (not norm_last_layer)
    head(torch.randn(3, 8)).sum().backward()
    assert (head.last_layer.weight_g.grad is None) is norm_last_layer
    assert head.last_layer.weight_v.grad is not None
    if norm_last_layer:  # rows of unit norm: |logit| <= |bottleneck| = 1
        assert head(torch.randn(10, 8)).abs().max() <= 1 + 1e-5


def test_dino_head_forward_formula():
    torch.manual_seed(5)
    head = _randomise_(DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, nlayers=3)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    l1, l2, l3 = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    hidden = F.gelu(l2(F.gelu(l1(x))))
    z = l3(hidden)
    z = z / z.norm(dim=-1, keepdim=True)
    w = head.last_layer.weight_g * head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.T)


@pytest.mark.parametrize(
    "norm,act,share",
    [("ln", "relu", True), ("ln", "gelu", False), ("bn", "gelu", True), ("bn", "relu", False), (None, "relu", False)],
)
def test_dino_head_norm_and_activation_options(norm, act, share):
    """iBOT's --norm_in_head / --act_in_head: Linear -> norm -> activation per hidden layer, in
    iBOT's layer order (so its state-dict names), against the formula in float64; one norm
    module shared by the hidden layers as iBOT builds it, or one each as DINO's use_bn."""
    torch.manual_seed(7)
    head = _randomise_(
        DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, nlayers=3, norm=norm, act=act, share_norm=share)
    ).double()
    head.eval()  # BatchNorm: the running statistics, made non-trivial below
    norms = [m for m in head.mlp if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d))]
    assert len(norms) == (2 if norm else 0)
    if norm:  # iBOT appends one module twice; its parameters are listed (and optimised) once
        assert (norms[0] is norms[1]) == share
        assert len(list(head.parameters())) == 8 + (2 if share else 4)
    for m in norms:
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 8, dtype=torch.float64)
    l1, l2, l3 = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    f = torch.relu if act == "relu" else F.gelu

    def normed(h, m):
        if norm == "ln":
            return F.layer_norm(h, (16,), m.weight, m.bias, m.eps)
        if norm == "bn":
            return (h - m.running_mean) / (m.running_var + m.eps).sqrt() * m.weight + m.bias
        return h

    h = f(normed(l1(x), norms[0] if norms else None))
    h = f(normed(l2(h), norms[1] if norms else None))
    z = F.normalize(l3(h), dim=-1)
    w = head.last_layer.weight_g * head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.T)
    if norm:  # iBOT's iBOTHead: mlp.0 Linear, mlp.1 norm, mlp.2 act, mlp.3 Linear, ...
        names = {"mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"}
        assert names <= set(head.state_dict())
    # DINO's use_bn is the 'bn' norm; unknown names are errors
    assert [type(m) for m in DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, use_bn=True).mlp] == [
        type(m) for m in DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, norm="bn").mlp
    ]
    with pytest.raises(ValueError, match="unknown head norm 'gn'"):
        DINOHead(8, 6, norm="gn")
    with pytest.raises(ValueError, match="unknown head activation 'tanh'"):
        DINOHead(8, 6, act="tanh")


def test_forward_patches_uses_second_layer_unless_shared():
    torch.manual_seed(6)
    x = torch.randn(7, 8)
    separate = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, patch_out_dim=5)
    assert separate.last_layer2 is not None
    out = separate.forward_patches(x)
    assert out.shape == (7, 5)
    z = F.normalize(separate.mlp(x), dim=-1)
    torch.testing.assert_close(out, separate.last_layer2(z))
    assert separate(x).shape == (7, 6)

    shared = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4, patch_out_dim=6, shared_head=True)
    assert shared.last_layer2 is None
    torch.testing.assert_close(shared.forward_patches(x), shared(x))
    assert not any(k.startswith("last_layer2") for k in shared.state_dict())


@pytest.mark.parametrize("size", [(96, 96), (64, 80), (320, 320)])
def test_other_image_sizes_give_dinos_features(size):
    # DINO's ViT (bench/reference.py) interpolates its positions bicubically with scale factors
    # (n + 0.1) / 14 and no antialiasing; timm's resample (used before) antialiases when shrinking,
    # which changed every local crop's positions (0.37 relative on a smooth 14 -> 6 grid)
    from bench.reference import RefVisionTransformer

    torch.manual_seed(0)
    ref = RefVisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3).eval()
    ours = VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3, mode="official").eval()
    state = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict({**state, "masked_embed": ours.masked_embed.detach()})
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        grid = (size[0] // 16, size[1] // 16)
        positions = vision_transformer.interpolate_pos_embed(ref.pos_embed, grid, num_prefix_tokens=1)
        assert positions.shape == (1, 1 + grid[0] * grid[1], 48)
        torch.testing.assert_close(positions, ref.interpolate_pos_encoding(positions, *size))


def test_weight_normed_layer_starts_as_dinos_nn_linear():
    # DINO's last layer is an nn.Linear made after the head's trunc_normal_(std=0.02) pass, so it
    # keeps nn.Linear's uniform(+-1/sqrt(in)) init; with weight norm the scale of v sets how fast
    # Adam's steps turn each row (before: std 0.02, rows ~1.8x shorter, turning ~1.8x faster)
    torch.manual_seed(0)
    v = WeightNormLinear(256, 4096).weight_v.detach().double()
    bound = 1 / 256**0.5
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert abs(v.std().item() - bound / 3**0.5) < 1e-3  # a uniform's std
    ref = torch.nn.Linear(256, 4096, bias=False).weight.detach().double()
    assert abs(v.norm(dim=1).mean() - ref.norm(dim=1).mean()) < 0.01
