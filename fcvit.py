"""FCViT: a fully convolutional MetaFormer whose token mixer adds a global context to
every token (Ma et al., "A Close Look at Spatial Modeling: From Attention to
Convolution", 2022), written here from the paper's description.

The network is timm's ``MetaFormer`` (PoolFormer layout: a 7x7/4 stem, 4 stages,
3x3/2 downsampling between them, so stride 32 overall; GroupNorm, GELU MLP of ratio
4, layer scale; no [CLS] token) with :class:`GlobalContextMixer` as the token mixer.
Its own head is global average pooling + LayerNorm + linear classifier; as a
self-supervised backbone use ``num_classes=0`` through ``simpool.build_backbone``,
which pools the last feature map by GAP or SimPool.

Example:
    >>> model = fcvit_tiny()                        # 1000-class classifier, 224x224 input
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> trunk = fcvit_b12(num_classes=0, global_pool="")
    >>> trunk.forward_features(torch.randn(2, 3, 96, 96)).shape   # last feature map, stride 32
    torch.Size([2, 512, 3, 3])
"""
import torch
import torch.nn as nn
from timm.layers import GroupNorm1
from timm.models.metaformer import MetaFormer

__all__ = ["GlobalContextMixer", "FCVIT_CONFIGS", "MIXER_DEFAULTS", "PUBLISHED_PARAMS", "build_fcvit",
           "fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48"]


class GlobalContextMixer(nn.Module):
    """FCViT token mixer on a (B, C, H, W) map.

    1. Global context: the global-average-pooled vector g (B, C).
    2. Token-global similarity, per group of C / ``groups`` channels: the cosine of
       each token with g (dot product of the L2-normalised vectors), mapped by a
       learnable per-group scale and shift and a sigmoid to a weight in (0, 1).
    3. Every token receives the context weighted by its similarity: x + w * g.
    4. Competition-driven bottleneck: a 1x1 conv to 2 x C / ``reduction`` channels,
       maxout over the 2 groups (the two halves compete channel by channel), and a
       1x1 conv back to C.
    5. Fused with local spatial mixing: plus a ``kernel_size`` depth-wise conv of x.

    Example:
        >>> mixer = GlobalContextMixer(64)
        >>> mixer(torch.randn(2, 64, 14, 14)).shape
        torch.Size([2, 64, 14, 14])
    """

    def __init__(self, dim, groups=8, reduction=2, kernel_size=11, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        if dim % groups:
            raise ValueError(f"GlobalContextMixer: dim {dim} is not divisible by groups {groups}")
        dd = {"device": device, "dtype": dtype}
        hidden = dim // reduction
        self.groups = groups
        self.sim_scale = nn.Parameter(torch.ones(groups, **dd))
        self.sim_shift = nn.Parameter(torch.zeros(groups, **dd))
        self.reduce = nn.Conv2d(dim, 2 * hidden, 1, **dd)
        self.expand = nn.Conv2d(hidden, dim, 1, **dd)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def similarity(self, x):
        """Per-group token-global weights (B, groups, H, W) in (0, 1), and the grouped
        context (B, groups, C / groups, 1, 1)."""
        B, C, H, W = x.shape
        tokens = x.reshape(B, self.groups, C // self.groups, H, W)
        context = tokens.mean(dim=(3, 4), keepdim=True)
        # cosine = <token, context> / (|token| |context|), written out: F.normalize over this
        # short middle dimension is ~5x slower on CPU
        token_norm = tokens.square().sum(dim=2).clamp_min(1e-12).sqrt()
        context_norm = context.square().sum(dim=2).clamp_min(1e-12).sqrt()
        cosine = (tokens * context).sum(dim=2) / (token_norm * context_norm)
        weight = torch.sigmoid(cosine * self.sim_scale.view(1, -1, 1, 1) + self.sim_shift.view(1, -1, 1, 1))
        return weight, context

    def forward(self, x):
        B, C, H, W = x.shape
        weight, context = self.similarity(x)
        with_context = x + (weight.unsqueeze(2) * context).reshape(B, C, H, W)
        y = self.reduce(with_context)
        y = y.reshape(B, 2, -1, H, W).amax(dim=1)  # maxout: the 2 groups compete channel by channel
        y = self.expand(y)
        return self.proj_drop(y + self.dwconv(x))


# name: depths, dims. PoolFormer's stage split (1:1:3:1) with 12, 24 and 48 blocks and its
# S-model widths for B12/B24/B48; tiny is the 12-block layout at half width (last stage 320).
# Every size mixes with a 2:1 maxout bottleneck and an 11x11 depth-wise conv (MIXER_DEFAULTS);
# with these the parameter counts are within 1% of the published ones (tests/test_fcvit.py).
FCVIT_CONFIGS = {
    "fcvit_tiny": dict(depths=(2, 2, 6, 2), dims=(32, 64, 160, 320)),
    "fcvit_b12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
    "fcvit_b24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512)),
    "fcvit_b48": dict(depths=(8, 8, 24, 8), dims=(64, 128, 320, 512)),
}
MIXER_DEFAULTS = dict(groups=8, reduction=2, kernel_size=11)

# Parameter counts reported in the paper (1000-class head, ImageNet 224x224).
PUBLISHED_PARAMS = {"fcvit_tiny": 4.6e6, "fcvit_b12": 14.0e6, "fcvit_b24": 25.7e6, "fcvit_b48": 49.1e6}


def build_fcvit(arch, num_classes=1000, global_pool="avg", drop_path_rate=0.0, **kwargs):
    """FCViT by name (one of ``FCVIT_CONFIGS``) as a timm ``MetaFormer``; ``kwargs`` go to
    ``MetaFormer`` (e.g. ``in_chans``) or to the token mixer (``groups``, ``reduction``,
    ``kernel_size``)."""
    if arch not in FCVIT_CONFIGS:
        raise ValueError(f"unknown FCViT {arch!r}; choose one of {', '.join(FCVIT_CONFIGS)}")
    config = {**FCVIT_CONFIGS[arch], **MIXER_DEFAULTS, **kwargs}
    return MetaFormer(
        num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
        token_mixers=GlobalContextMixer, mlp_act=nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
        downsample_norm=None, layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False,
        **config)


def fcvit_tiny(**kwargs):
    """FCViT-tiny (paper: 4.6M parameters)."""
    return build_fcvit("fcvit_tiny", **kwargs)


def fcvit_b12(**kwargs):
    """FCViT-B12, 12 blocks (paper: 14M parameters)."""
    return build_fcvit("fcvit_b12", **kwargs)


def fcvit_b24(**kwargs):
    """FCViT-B24, 24 blocks (paper: 25.7M parameters)."""
    return build_fcvit("fcvit_b24", **kwargs)


def fcvit_b48(**kwargs):
    """FCViT-B48, 48 blocks (paper: 49.1M parameters)."""
    return build_fcvit("fcvit_b48", **kwargs)
