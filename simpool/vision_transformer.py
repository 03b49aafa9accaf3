"""Vision Transformers without a [CLS] token, pooled by SimPool, and the DINO/iBOT heads.

Built from timm's layers (``Block`` with fused scaled-dot-product attention and stochastic
depth that skips dropped samples, ``PatchEmbed``'s weights applied as one matrix product,
``trunc_normal_``); state-dict names follow the DINO/timm ViT
(``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``, ``pos_embed``) plus
``simpool.*`` and ``masked_embed`` (iBOT's mask token).

Example:
    >>> model = vit_small(patch_size=16, mode="simpool", gamma=1.25)
    >>> out = model.forward_features(torch.randn(2, 3, 224, 224), return_attention=True)
    >>> out["pooled"].shape, out["patch_tokens"].shape, out["attention"].shape
    (torch.Size([2, 384]), torch.Size([2, 196, 384]), torch.Size([2, 196]))
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from simpool.pooling import SimPool

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

MODES = ("simpool", "official")


class VisionTransformer(nn.Module):
    """ViT whose image vector is SimPool over the patch tokens (``mode='simpool'``)
    or the [CLS] token (``mode='official'``, the DINO baseline).

    ``forward(x)`` returns the pooled (B, embed_dim) vector; ``forward_features``
    also returns the normalised patch tokens and, on request, the pooling
    attention over patches (SimPool's map, or the last block's [CLS] row averaged
    over heads).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        mode: str = "simpool",
        gamma: float | None = None,
        use_beta: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.num_prefix_tokens = 1 if mode == "official" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mode == "official" else None
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            [
                SkippingBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    attn_layer=FusedAttention,
                )
                for i in range(depth)
            ]
        )
        self.simpool = SimPool(embed_dim, gamma=gamma, use_beta=use_beta) if mode == "simpool" else None
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False
        # the official SimPool code resamples positions even at the training size (its [CLS]-less
        # token count never matches the grid check it inherited from DINO); its weights need the same
        self.resample_native_pos = False
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input for the backward and recompute the block there:
        activation memory of one block instead of all, for about one more forward pass
        (the timm method name). Applies only where gradients are being recorded."""
        self.grad_checkpointing = enable

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, add (resized) positions."""
        grid = self.grid_size(*x.shape[-2:])
        x = embed_patches(self.patch_embed.proj, x)
        if mask is not None:
            x = torch.where(mask.reshape(x.shape[0], -1, 1), self.masked_embed.to(x.dtype), x)
        pos = self.pos_embed
        if self.resample_native_pos or tuple(grid) != tuple(self.patch_embed.grid_size):
            pos = interpolate_pos_embed(pos, grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + pos

    def forward_features(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Return a dict with ``pooled`` (B, D), ``patch_tokens`` (B, N, D) after the final
        norm, ``raw_patch_tokens`` (B, N, D) before it, and ``attention`` (B, N) when
        ``return_attention`` is set."""
        x = self.prepare_tokens(x, mask)
        attention = None
        for i, blk in enumerate(self.blocks):
            if return_attention and self.mode == "official" and i == len(self.blocks) - 1:
                attention = cls_attention(blk, x, self.num_prefix_tokens)
            if self.grad_checkpointing and torch.is_grad_enabled():
                # non-reentrant: the recomputation replays the saved RNG state, so drop-path
                # drops the same samples as the first pass
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        patches = x[:, self.num_prefix_tokens :]
        if self.mode == "simpool":
            pooled = self.simpool(patches, return_attention=return_attention)
            if return_attention:
                pooled, attention = pooled
        else:
            pooled = x[:, 0]
        return {
            "pooled": self.norm(pooled),
            "patch_tokens": self.norm(patches),
            "raw_patch_tokens": patches,
            "attention": attention,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Position embeddings (1, prefix + n*n, D) of a square n x n patch grid resized to ``grid`` =
    (rows, cols), as DINO (and SimPool, iBOT, AttMask after it) does for local crops and other
    image sizes: bicubic, no antialiasing, scale factors (rows + 0.1) / n and (cols + 0.1) / n (the
    0.1 keeps floor(n * scale) from rounding below the target). The prefix ([CLS]) rows are kept.

    Example:
        >>> interpolate_pos_embed(torch.zeros(1, 1 + 14 * 14, 8), (6, 6), num_prefix_tokens=1).shape
        torch.Size([1, 37, 8])
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed holds {patches.shape[1]} patch positions, not a square grid")
    dim = patches.shape[-1]
    resized = F.interpolate(
        patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float(),
        scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
        mode="bicubic",
    )
    resized = resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, resized], dim=1)


def embed_patches(proj: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``proj`` (the patch embedding's stride-p p x p convolution) applied to images ``x`` (B, C, H, W)
    as one matrix product over the flattened patches: (B, N, D), token-major and contiguous.
    The convolution's result up to summation order (pixels past the last whole patch dropped,
    as there), for less time on the CPU, where oneDNN's backward of a strided convolution is slow."""
    D, C, p, q = proj.weight.shape
    B, _, H, W = x.shape
    gh, gw = H // p, W // q
    if torch.is_autocast_enabled(x.device.type):  # the product runs in the autocast dtype: copy once
        x = x.to(torch.get_autocast_dtype(x.device.type))
    patches = x[:, :, : gh * p, : gw * q].reshape(B, C, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5)
    return F.linear(patches.reshape(B, gh * gw, C * p * q), proj.weight.reshape(D, -1), proj.bias)


class SkippingBlock(Block):
    """timm's pre-norm transformer ``Block`` whose stochastic depth skips the work it drops:
    in training, each residual branch runs only on the samples drop-path keeps (the same
    Bernoulli draws, scale and result as timm's ``DropPath``; dropped samples pass through
    unchanged), instead of computing the branch for every sample and multiplying some by
    zero. With DINO's linear drop-path schedule (0 to 0.1 over 12 blocks) that is 5% of the
    student's block work. On the CPU only: on a GPU, reading the kept count on the host would
    synchronise with the device at every branch. Under ``torch.compile`` (where the kept count
    would change the graph's shapes every step) and in eval mode it is timm's block too."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        drop_prob = getattr(self.drop_path1, "drop_prob", 0.0)
        if (
            not self.training
            or drop_prob == 0.0
            or x.device.type != "cpu"
            or attn_mask is not None
            or is_causal
            or torch.compiler.is_compiling()
        ):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = _kept_residual(x, lambda t: self.ls1(self.attn(self.norm1(t))), drop_prob)
        return _kept_residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), drop_prob)


def _kept_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_prob: float) -> torch.Tensor:
    """x + DropPath(branch(x)), running ``branch`` on the kept samples only."""
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty(x.shape[0]).bernoulli_(keep_prob).nonzero()[:, 0]  # timm's draw, one per sample
    if keep.numel() == 0:
        return x
    whole = keep.numel() == x.shape[0]
    y = branch(x if whole else x.index_select(0, keep))
    y = y * y.new_full((), 1.0 / keep_prob)  # timm scales in the branch's dtype
    return x + y if whole else x.index_add(0, keep, y.to(x.dtype))


class FusedAttention(Attention):
    """timm's multi-head self-attention: the fused ``scaled_dot_product_attention`` or an
    explicit ``softmax(q kᵀ) v``, whichever is faster on the CPU (docs/performance.md):
      * under bf16 autocast with a backward, explicit: the fused kernel's bf16 backward is
        slower than its fp32 one, and the explicit bf16 path beats both. The bf16 softmax kernel
        accumulates in fp32; its output is as accurate as an fp32 softmax rounded to bf16;
      * under 64 tokens (local crops, small images), explicit in any dtype;
      * otherwise fused: long fp32 sequences (equal speed, less memory), and bf16 without a
        backward (the teacher).
    On CUDA always fused. The explicit path holds the same memory as the official DINO
    attention, which is always explicit."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        plain = x.device.type == "cpu" and attn_mask is None and not is_causal
        backward = torch.is_grad_enabled() and q.requires_grad
        if plain and (N < 64 or (backward and q.dtype == torch.bfloat16)):
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(weights) @ v
        else:  # long sequences in fp32, or bf16 without a backward (the teacher): the fused kernel
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def cls_attention(
    block: nn.Module, x: torch.Tensor, num_prefix_tokens: int = 1, average_heads: bool = True
) -> torch.Tensor:
    """The [CLS] row of ``block``'s self-attention on input ``x`` (B, T, C), over the
    patch tokens only (the first ``num_prefix_tokens`` columns dropped): (B, N) averaged
    over heads, or (B, heads, N) with ``average_heads=False``. Only the one query row is
    computed; the logits and the softmax are in fp32, also under autocast."""
    attn = block.attn
    B, T, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim)
    q = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, h, 1, hd)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, h, T, hd)
    with torch.autocast(x.device.type, enabled=False):
        logits = q.float() @ k.float().transpose(-2, -1) * attn.scale
    weights = logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:]
    return weights.mean(dim=1) if average_heads else weights


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


ARCHS = {  # name: (embed_dim, depth, num_heads)
    "vit_pico": (128, 6, 2),
    "vit_nano": (192, 6, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def _builder(name: str) -> Callable[..., VisionTransformer]:
    embed_dim, depth, num_heads = ARCHS[name]

    def build(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
        return VisionTransformer(
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            qkv_bias=True,
            **kwargs,
        )

    build.__name__ = name
    build.__doc__ = f"ViT with embed_dim={embed_dim}, depth={depth}, heads={num_heads}."
    return build


vit_pico = _builder("vit_pico")
vit_nano = _builder("vit_nano")
vit_tiny = _builder("vit_tiny")
vit_small = _builder("vit_small")
vit_base = _builder("vit_base")
vit_large = _builder("vit_large")


def build_vit(arch: str, **kwargs: Any) -> VisionTransformer:
    """Build a ViT by name (one of ``ARCHS``); kwargs go to ``VisionTransformer``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return globals()[arch](**kwargs)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight W = g * v / ||v|| (rows), as
    ``nn.utils.weight_norm`` defines it, keeping its ``weight_g``/``weight_v``
    names so DINO checkpoints load."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        # nn.Linear's own initialisation, as DINO's weight-normed layer keeps it (made after the
        # head's trunc_normal_ pass): the norm of v sets how fast Adam turns the rows
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused weight-norm kernel (as nn.utils.weight_norm): one pass forward and
        # backward over the (out_dim, in_dim) weight instead of normalize + scale
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))


HEAD_NORMS = ("bn", "syncbn", "ln")  # iBOT's --norm_in_head values that need no extra machinery
HEAD_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _head_norm(norm: str | None, width: int) -> nn.Module | None:
    """The hidden layers' normalisation: BatchNorm ('syncbn' too: the training script turns every
    BatchNorm into SyncBatchNorm under DDP, as DINO and iBOT do), LayerNorm, or none."""
    if norm is None:
        return None
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm1d(width)
    if norm == "ln":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown head norm {norm!r}; choose one of {', '.join(HEAD_NORMS)} or None")


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normed linear to ``out_dim``.

    The MLP's hidden layers are Linear [-> norm] -> activation: ``norm`` None, 'bn', 'syncbn'
    or 'ln' (iBOT's ``--norm_in_head``; ``use_bn=True`` is DINO's spelling of 'bn'), ``act``
    'gelu' or 'relu' (iBOT's ``--act_in_head``). ``share_norm``: one norm module after every
    hidden layer, as iBOT's head (and AttMask's copy of it) builds for ``--norm_in_head``, so
    the layers share its weights (and BatchNorm's running statistics); without it each layer
    has its own, as in DINO's head with ``use_bn``. The state dict names both places either way.
    With ``patch_out_dim`` the head also projects patch tokens for the iBOT loss:
    through the same MLP, then the same last layer (``shared_head=True``) or a
    second one (``last_layer2``) of width ``patch_out_dim``.

    Example:
        >>> head = DINOHead(384, 1024, patch_out_dim=1024, shared_head=True)
        >>> head(torch.randn(4, 384)).shape, head.forward_patches(torch.randn(7, 384)).shape
        (torch.Size([4, 1024]), torch.Size([7, 1024]))
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        patch_out_dim: int | None = None,
        shared_head: bool = False,
        norm: str | None = None,
        act: str = "gelu",
        share_norm: bool = False,
    ) -> None:
        super().__init__()
        if use_bn and norm not in (None, "bn"):
            raise ValueError(f"use_bn=True asks for BatchNorm, norm={norm!r} for another")
        norm = "bn" if use_bn else norm
        if act not in HEAD_ACTS:
            raise ValueError(f"unknown head activation {act!r}; choose one of {', '.join(HEAD_ACTS)}")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            shared_norm = _head_norm(norm, hidden_dim) if share_norm else None
            for i in range(nlayers - 1):
                hidden_norm = shared_norm if share_norm else _head_norm(norm, hidden_dim)
                if hidden_norm is not None:
                    layers.append(hidden_norm)
                layers.append(HEAD_ACTS[act]())
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if i == nlayers - 2 else hidden_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer2 = None
        if patch_out_dim is not None and not shared_head:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim)
        if norm_last_layer:  # fixed unit-norm rows: DINO's guard against collapse for large ViTs
            self.last_layer.weight_g.requires_grad = False
            if self.last_layer2 is not None:
                self.last_layer2.weight_g.requires_grad = False

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self._bottleneck(x))

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Project (M, in_dim) patch tokens for the iBOT loss."""
        last = self.last_layer2 if self.last_layer2 is not None else self.last_layer
        return last(self._bottleneck(x))
