"""SimPool: attention-based pooling of patch tokens into one image vector.

Psomas et al., "Keep It SimPool: Who Said Supervised Transformers Suffer from
Attention Deficit?", ICCV 2023. The query is the mean of the patch tokens, the
keys are the layer-normalised tokens, and the values are the layer-normalised
tokens themselves (no value projection), optionally pooled with a generalised
mean of exponent gamma.

Example:
    >>> pool = SimPool(384, gamma=1.25)
    >>> x = torch.randn(2, 196, 384)          # (B, N, d) transformer tokens
    >>> pool(x).shape
    torch.Size([2, 384])
    >>> vec, attn = pool(torch.randn(2, 384, 7, 7), return_attention=True)
    >>> attn.shape                            # one weight per token
    torch.Size([2, 49])
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SimPool"]


class SimPool(nn.Module):
    """Pool (B, N, d) tokens or a (B, d, H, W) feature map into (B, d).

    Args:
        dim: channel width d.
        num_heads: attention heads; with several heads each head pools its own
            d / num_heads channels with its own attention map.
        qkv_bias: bias in the query and key projections.
        qk_scale: attention scale; default (d / num_heads) ** -0.5.
        gamma: exponent of the generalised mean; ``None`` pools with a plain
            attention-weighted average.
        use_beta: add a learned scalar offset to the pooled vector (also with ``gamma=None``,
            where the official release leaves it out; its weights carry no ``beta`` then).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        gamma: float | None = None,
        use_beta: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SimPool: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.gamma = gamma
        self.eps = 1e-6
        # Names follow the official release so its checkpoints load unchanged.
        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.beta = nn.Parameter(torch.zeros(1)) if use_beta else None

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4:  # (B, d, H, W) -> (B, H*W, d)
            x = x.flatten(2).transpose(1, 2)
        if x.dim() != 3:
            raise ValueError(f"SimPool expects (B, N, d) or (B, d, H, W) input, got shape {tuple(x.shape)}")
        B, N, d = x.shape
        h = self.num_heads
        query = self.wq(x.mean(dim=1))  # (B, d): initialised by global average pooling
        tokens = self.norm_patches(x)
        keys = self.wk(tokens)
        q = query.reshape(B, h, 1, d // h)
        k = keys.reshape(B, N, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        v = tokens.reshape(B, N, h, d // h).transpose(1, 2)
        # Logits, softmax and pooling in at least fp32, also under autocast (which would run both
        # products in bf16): bf16 logits tie and reorder the ranking that AttMask masks by.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, h, 1, N)
            if self.gamma is None:
                pooled = attn @ v
            else:
                # Shift each sample's values to be positive; the minimum is taken per sample
                # so that a sample's vector never depends on its batch-mates.
                v = v - v.amin(dim=(1, 2, 3), keepdim=True) + self.eps
                pooled = (attn @ v.pow(self.gamma)).pow(1.0 / self.gamma)
        pooled = pooled.reshape(B, d)
        if self.beta is not None:
            pooled = pooled + self.beta
        pooled = pooled.to(x.dtype)
        if not return_attention:
            return pooled
        attn = attn.reshape(B, h, N)
        return pooled, (attn[:, 0] if h == 1 else attn)
