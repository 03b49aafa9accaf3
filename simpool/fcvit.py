"""FCViT as its authors released it (Ma et al., "A Close Look at Spatial Modeling: From
Attention to Convolution", 2022): the network their ImageNet checkpoints were trained with,
written here from a description of their released model definition, with its state-dict
names, so that those checkpoints load strictly and give their outputs.

Layout (``network`` is one flat list, as released):

- ``patch_embed``: 7x7/4 conv + BatchNorm; ``network``: stage 0, a 3x3/2 conv + BatchNorm
  embedding, stage 1, embedding, stage 2, embedding, stage 3; stride 32 overall.
- Each block: ``x + layer_scale_1 * token_mixer(norm1(x))``, then ``x + layer_scale_2 *
  channel_mixer(norm2(x))``; GroupNorm with one group, layer scales from 1e-5, stochastic
  depth rising linearly over all blocks.
- Token mixer (:class:`GlobalContextMixer`): two rounds of a global context added to every
  position (:class:`GlobalContext`), an 11x11 depth-wise conv and a 1x1 bottleneck, each
  round ending in GELU. Channel mixer (:class:`ChannelMixer`): 1x1 conv, 3x3 depth-wise
  conv, GELU, 1x1 conv, widened 8x in the first two stages and 4x in the last two.
- Head: GroupNorm ``norm`` on the last map, spatial mean, Linear ``head``.

``forward_features`` returns the normed last map, which this project's backbone wrapper
(``simpool.build_backbone``) pools by its spatial mean (official mode) or by SimPool.

Example:
    >>> model = fcvit_tiny()                        # 1000-class classifier
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> trunk = fcvit_b12(num_classes=0)
    >>> trunk.forward_features(torch.randn(2, 3, 96, 96)).shape   # normed last map, stride 32
    torch.Size([2, 512, 3, 3])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, GroupNorm1, trunc_normal_
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "GlobalContext",
    "GlobalContextMixer",
    "ChannelMixer",
    "Block",
    "Embedding",
    "FCViT",
    "FCVIT_CONFIGS",
    "MLP_RATIOS",
    "RELEASED_PARAMS",
    "README_PARAMS",
    "build_fcvit",
    "fcvit_tiny",
    "fcvit_b12",
    "fcvit_b24",
    "fcvit_b48",
]

# name: blocks per stage, widths (the released definitions)
FCVIT_CONFIGS = {
    "fcvit_tiny": dict(depths=(3, 3, 5, 2), dims=(32, 64, 160, 320)),
    "fcvit_b12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
    "fcvit_b24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512)),
    "fcvit_b48": dict(depths=(8, 8, 24, 8), dims=(64, 128, 320, 512)),
}
MLP_RATIOS = (8, 8, 4, 4)  # channel-mixer widening per stage, every size

# Parameters with the 1000-class head: those of the released code, which its checkpoints fit,
# and those of the authors' README table, which match neither.
RELEASED_PARAMS = {"fcvit_tiny": 4_784_752, "fcvit_b12": 14_701_832, "fcvit_b24": 26_960_232, "fcvit_b48": 51_477_032}
README_PARAMS = {"fcvit_tiny": 4.6e6, "fcvit_b12": 14.0e6, "fcvit_b24": 25.7e6, "fcvit_b48": 49.1e6}


class GlobalContext(nn.Module):
    """The global context that every position of a (B, C, H, W) map receives.

    With g the spatial mean of x and C split into ``num_heads`` heads: per head, the
    similarity of each position with g (dot product over the head's channels, scaled by
    1/sqrt(C/heads)), standardised per sample over all heads and positions together, then
    scaled and shifted per head (``rescale_weight``, ``rescale_bias``); it weighs a context
    vector per head made from g by a maxout bottleneck (``fc1`` to 2 x C/heads, the larger of
    the two halves, ``fc2`` back to C). Output: similarity x context, a (B, C, H, W) map.

    Example:
        >>> GlobalContext(64)(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GlobalContext: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.rescale_weight = nn.Parameter(torch.ones(num_heads))
        self.rescale_bias = nn.Parameter(torch.zeros(num_heads))
        self.fc1 = nn.Linear(dim, 2 * self.head_dim)
        self.fc2 = nn.Linear(self.head_dim, dim)

    def similarity(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(B, heads, H, W): each position's standardised, rescaled similarity with ``g`` (B, C)."""
        B, C, H, W = x.shape
        tokens = x.reshape(B, self.num_heads, self.head_dim, H, W)
        s = (tokens * g.reshape(B, self.num_heads, self.head_dim, 1, 1)).sum(dim=2) * self.scale
        std, mean = torch.std_mean(s, dim=(1, 2, 3), keepdim=True)
        s = (s - mean) / (std + 1e-5)
        return s * self.rescale_weight.view(1, -1, 1, 1) + self.rescale_bias.view(1, -1, 1, 1)

    def context(self, g: torch.Tensor) -> torch.Tensor:
        """(B, heads, C/heads): the maxout bottleneck of ``g``; its two halves compete channel by channel."""
        B = g.shape[0]
        hidden = self.fc1(g).reshape(B, 2, self.head_dim).amax(dim=1)
        return self.fc2(hidden).reshape(B, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=(2, 3))
        s = self.similarity(x, g)
        return (s.unsqueeze(2) * self.context(g)[..., None, None]).reshape(x.shape)


def _bottleneck(dim: int) -> nn.Sequential:
    """1x1 conv C -> max(C/8, 16), GELU, 1x1 conv back (keys ``0`` and ``2``, as released)."""
    hidden = max(dim // 8, 16)
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))


class GlobalContextMixer(nn.Module):
    """FCViT's token mixer: two rounds (``gc1``/``dw1``/``fc1``, then ``gc2``/``dw2``/``fc2``) of
    ``x = x + gc(x)`` and ``x = GELU(fc(dw(x)))``, with ``dw`` a depth-wise ``kernel_size`` conv
    and ``fc`` the 1x1 bottleneck: the global context reaches every position, the conv mixes locally.

    Example:
        >>> GlobalContextMixer(32)(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    def __init__(self, dim: int, num_heads: int = 8, kernel_size: int = 11) -> None:
        super().__init__()
        depthwise = dict(kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.gc1, self.dw1, self.fc1 = GlobalContext(dim, num_heads), nn.Conv2d(dim, dim, **depthwise), _bottleneck(dim)
        self.gc2, self.dw2, self.fc2 = GlobalContext(dim, num_heads), nn.Conv2d(dim, dim, **depthwise), _bottleneck(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gc, dw, fc in ((self.gc1, self.dw1, self.fc1), (self.gc2, self.dw2, self.fc2)):
            x = x + gc(x)
            x = F.gelu(fc(dw(x)))
        return x


class ChannelMixer(nn.Module):
    """1x1 conv C -> ratio x C (``fc1``), 3x3 depth-wise conv (``dwconv``), GELU, 1x1 conv back (``fc2``)."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x))))


class Block(nn.Module):
    """One FCViT block: pre-norm token mixer and channel mixer, each residual branch scaled
    per channel (``layer_scale_1``/``_2``, from ``layer_scale_init_value``) and dropped by
    stochastic depth with probability ``drop_path``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-5,
        num_heads: int = 8,
        kernel_size: int = 11,
    ) -> None:
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = GlobalContextMixer(dim, num_heads, kernel_size)
        self.norm2 = GroupNorm1(dim)
        self.channel_mixer = ChannelMixer(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.channel_mixer(self.norm2(x)))


class Embedding(nn.Module):
    """A strided conv (``proj``) and BatchNorm (``norm``): the stem and each downsampling step."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=padding)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class FCViT(nn.Module):
    """The released FCViT (see the module docstring); ``num_classes=0`` leaves out the classifier
    (``head`` is then an identity and ``forward`` gives the pooled vector)."""

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        mlp_ratios: Sequence[int] = MLP_RATIOS,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
        num_heads: int = 8,
        kernel_size: int = 11,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_features = num_classes, dims[-1]
        self.grad_checkpointing = False
        self.patch_embed = Embedding(in_chans, dims[0], 7, 4, 3)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        network = []
        for i, (depth, dim, ratio) in enumerate(zip(depths, dims, mlp_ratios)):
            if i:
                network.append(Embedding(dims[i - 1], dim, 3, 2, 1))
            first = sum(depths[:i])
            network.append(
                nn.Sequential(
                    *[
                        Block(dim, ratio, rates[first + j], layer_scale_init_value, num_heads, kernel_size)
                        for j in range(depth)
                    ]
                )
            )
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm1(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (drop
        path's random draws are replayed, so the gradients are the same)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, C, H/32, W/32) after the final ``norm``."""
        x = self.patch_embed(x)
        for part in self.network:
            if isinstance(part, nn.Sequential) and self.grad_checkpointing and torch.is_grad_enabled():
                for block in part:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = part(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Spatial mean of the normed map, then the classifier unless ``pre_logits``."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_fcvit(arch: str, num_classes: int = 1000, drop_path_rate: float = 0.0, **kwargs: Any) -> FCViT:
    """FCViT by name (one of ``FCVIT_CONFIGS``); ``kwargs`` go to :class:`FCViT` (e.g. ``in_chans``,
    ``layer_scale_init_value``)."""
    if arch not in FCVIT_CONFIGS:
        raise ValueError(f"unknown FCViT {arch!r}; choose one of {', '.join(FCVIT_CONFIGS)}")
    return FCViT(**FCVIT_CONFIGS[arch], num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)


def fcvit_tiny(**kwargs: Any) -> FCViT:
    """FCViT-tiny (4.78M parameters with the 1000-class head)."""
    return build_fcvit("fcvit_tiny", **kwargs)


def fcvit_b12(**kwargs: Any) -> FCViT:
    """FCViT-B12, 12 blocks (14.70M parameters with the 1000-class head)."""
    return build_fcvit("fcvit_b12", **kwargs)


def fcvit_b24(**kwargs: Any) -> FCViT:
    """FCViT-B24, 24 blocks (26.96M parameters with the 1000-class head)."""
    return build_fcvit("fcvit_b24", **kwargs)


def fcvit_b48(**kwargs: Any) -> FCViT:
    """FCViT-B48, 48 blocks (51.48M parameters with the 1000-class head)."""
    return build_fcvit("fcvit_b48", **kwargs)
