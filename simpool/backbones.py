"""One factory for every backbone the commands pretrain, evaluate or export.

``build_backbone(arch, ...)`` returns a module with the same interface for every family:

- ``forward(x)`` -> pooled image vector (B, embed_dim);
- ``forward_features(x, mask=None, return_attention=False)`` -> dict with ``pooled``
  (B, embed_dim), ``patch_tokens`` ((B, N, D) for ViTs, ``None`` for convnets) and
  ``attention`` ((B, h*w) pooling map when requested, else ``None``);
- ``embed_dim``, ``grid_size(height, width)`` (the token grid, or the last feature map's
  size for convnets), ``supports_masking`` (only ViTs have patch tokens to mask) and ``arch``;
- ``set_grad_checkpointing(enable=True)``: recompute activations in the backward.

Families:

- ViTs (``vision_transformer.ARCHS``): built by ``vision_transformer.build_vit``.
- ``resnet50``, ``convnext_tiny|small|base``: timm's models, classifier and global pool
  removed, in a :class:`ConvNetBackbone`.
- ``fcvit_tiny|b12|b24|b48``: FCViT as its authors released it (``fcvit.py``), classifier
  removed, likewise in a :class:`ConvNetBackbone`; its trunk's names are the released ones.

Pooling of the convnets' last feature map (``mode``):

- ``'official'``: the architecture's own pooling. ResNet: global average pooling (the
  2048-d vector DINO's ResNet-50 uses). ConvNeXt: global average pooling and then the
  model's head LayerNorm (timm's ``head.norm``), as its classifier does. FCViT: the global
  average of its last map after its GroupNorm ``norm`` (which comes before the pool there),
  the vector its released classifier reads.
- ``'simpool'``: SimPool over the h*w positions in place of the global average pooling,
  as the SimPool paper does for ResNet-50 and ConvNeXt; everything before and after the
  pool is kept. So ResNet's vector is SimPool's output as is, ConvNeXt's is SimPool's output
  through the same head LayerNorm (exactly as the SimPool ViT's vector passes the ViT's
  final LayerNorm), and FCViT's is SimPool over its normed last map. ``gamma='auto'`` means
  2.0 for convnets (the SimPool paper's convnet setting) and ``None`` for ViTs (this
  project's ViT default).

Example:
    >>> backbone = build_backbone("resnet50", mode="simpool")
    >>> out = backbone.forward_features(torch.randn(2, 3, 96, 96), return_attention=True)
    >>> out["pooled"].shape, out["patch_tokens"], out["attention"].shape
    (torch.Size([2, 2048]), None, torch.Size([2, 9]))
    >>> upsample_attention(out["attention"], feature_grid(backbone, 96, 96), (96, 96)).shape
    torch.Size([2, 96, 96])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from simpool import fcvit
from simpool import vision_transformer as vits
from simpool.pooling import SimPool

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ARCHS",
    "MODES",
    "pooling_knobs",
    "smallest_input",
    "arch_arg",
    "VIT_ARCHS",
    "TIMM_ARCHS",
    "FCVIT_ARCHS",
    "CONVNET_GAMMA",
    "ConvNetBackbone",
    "build_backbone",
    "resolve_gamma",
    "feature_grid",
    "upsample_attention",
    "supports_masking",
    "masking_off_message",
    "uses_batchnorm",
    "sync_batchnorm_supported",
]

MODES = ("simpool", "official")
VIT_ARCHS = tuple(vits.ARCHS)
TIMM_ARCHS = ("resnet50", "convnext_tiny", "convnext_small", "convnext_base")
FCVIT_ARCHS = tuple(fcvit.FCVIT_CONFIGS)
ARCHS = VIT_ARCHS + TIMM_ARCHS + FCVIT_ARCHS
CONVNET_GAMMA = 2.0  # SimPool's generalised-mean exponent for convnets ('auto')


def arch_arg(text: str) -> str:
    """argparse type of ``--arch``: DINO's scripts take ``deit_tiny``/``deit_small`` (DeiT's
    names for the same ViTs) and rename them to ``vit_*``; so does this. (argparse checks the
    choices after this rename.)"""
    return text.replace("deit", "vit") if text.startswith("deit_") else text


class ConvNetBackbone(nn.Module):
    """A convolutional trunk whose last (B, C, h, w) feature map is pooled into one
    (B, C) vector: by SimPool (``mode='simpool'``) or by global average pooling
    (``mode='official'``), then by ``head_norm`` when the architecture has one.

    Args:
        trunk: a timm model built with ``num_classes=0, global_pool=''`` (or an FCViT with
            ``num_classes=0``); its ``forward_features`` gives the last feature map.
        strided_layers: the convolutions and poolings on the trunk's main path that change
            the spatial size, in order; ``grid_size`` follows them.
        mode, gamma, use_beta: pooling, as in the module docstring; SimPool's arguments.
        head_norm: dotted name, inside ``trunk``, of a channels-first norm (e.g. timm's
            ``LayerNorm2d`` at ``'head.norm'``) applied to the pooled vector, or ``None``.
        channels_last: run the trunk in channels-last memory format (weights and inputs);
            where oneDNN's convolutions are faster that way (ResNet-50: 3.5 -> 2.6 s per
            pretraining step here, ``bench/backbones.py --channels_last``).

    State-dict names: ``trunk.*`` (timm's own names; FCViT's released ones) and ``simpool.*``
    (the official SimPool names), so ``backbone.trunk`` loads timm and released FCViT checkpoints.

    Example:
        >>> trunk = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="")
        >>> net = ConvNetBackbone(trunk, [trunk.conv1, trunk.maxpool], mode="official")
        >>> net(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 2048])
    """

    supports_masking = False  # no patch tokens: iBOT / AttMask masking does not apply
    # Smallest input side: one stride-32 cell. Below it ConvNeXt's last 2x2/2 conv has no room, and
    # ResNet's / FCViT's last 3x3/2 conv sees a 1x1 map, whose bf16 backward on CPU returns NaN
    # gradients at random with 2 threads (torch 2.14.1, oneDNN; docs/backbones.md).
    min_input_size = 32

    def __init__(
        self,
        trunk: nn.Module,
        strided_layers: Sequence[nn.Module],
        mode: str = "simpool",
        gamma: float | None = CONVNET_GAMMA,
        use_beta: bool = False,
        head_norm: str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.channels_last = channels_last
        self.trunk = trunk.to(memory_format=torch.channels_last) if channels_last else trunk
        self.embed_dim = self.num_features = trunk.num_features
        self.simpool = SimPool(self.embed_dim, gamma=gamma, use_beta=use_beta) if mode == "simpool" else None
        self.head_norm = head_norm  # a name, not a module: its weights are saved once, under trunk.*
        if head_norm is not None:
            trunk.get_submodule(head_norm)  # fail early on a wrong name
        # (kernel, stride, padding, dilation, ceil_mode) per (height, width) of each strided layer
        self._geometry = [_layer_geometry(m) for m in strided_layers]

    def grid_size(self, height: int, width: int) -> tuple[int, ...]:
        """(h, w) of the last feature map for a ``height`` x ``width`` input."""
        size = [height, width]
        for layer in self._geometry:
            size = [_output_size(n, *dim) for n, dim in zip(size, layer)]
        return tuple(size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the trunk's stages in the backward instead of keeping their activations
        (timm's own checkpointing)."""
        self.trunk.set_grad_checkpointing(enable)

    def forward_features(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Dict with ``pooled`` (B, C), ``patch_tokens`` None, and ``attention``: SimPool's
        (B, h*w) map over the last feature map when requested in 'simpool' mode, else None."""
        if mask is not None:
            raise ValueError(
                f"{type(self.trunk).__name__} has no patch tokens to mask; check supports_masking before passing a mask"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"{getattr(self, 'arch', type(self.trunk).__name__)} needs inputs of at least "
                f"{self.min_input_size}x{self.min_input_size} pixels, got "
                f"{x.shape[-2]}x{x.shape[-1]}; use larger crops (--global_crops_size, "
                "--local_crops_size)"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.trunk.forward_features(x)
        attention = None
        if self.simpool is not None:
            pooled = self.simpool(fmap, return_attention=return_attention)
            if return_attention:
                pooled, attention = pooled
        else:
            pooled = fmap.mean(dim=(2, 3))
        if self.head_norm is not None:
            pooled = self.trunk.get_submodule(self.head_norm)(pooled[:, :, None, None]).flatten(1)
        return {"pooled": pooled, "patch_tokens": None, "attention": attention}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]


def _layer_geometry(layer: nn.Module) -> list[tuple]:
    def pair(v: int | Sequence[int]) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if isinstance(layer.padding, str):
        raise ValueError(f"grid_size: string padding {layer.padding!r} of {layer} is not supported")
    dims = [pair(layer.kernel_size), pair(layer.stride), pair(layer.padding), pair(layer.dilation)]
    ceil_mode = getattr(layer, "ceil_mode", False)
    return [tuple(d[i] for d in dims) + (ceil_mode,) for i in range(2)]


def _output_size(n: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil_mode else span // stride) + 1


def _timm_trunk(arch: str, drop_path_rate: float, **kwargs: Any) -> nn.Module:
    return timm.create_model(
        arch, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path_rate, **kwargs
    )


def _resnet(
    arch: str, mode: str, gamma: float | None, use_beta: bool, drop_path_rate: float, **kwargs: Any
) -> ConvNetBackbone:
    trunk = _timm_trunk(arch, drop_path_rate, **kwargs)
    # stride 32: 7x7/2 stem conv, 3x3/2 max pool, then each later stage's first 3x3 conv
    strided = [trunk.conv1, trunk.maxpool] + [getattr(trunk, f"layer{i}")[0].conv2 for i in (2, 3, 4)]
    # channels-last: 26% shorter steps for ResNet-50; ConvNeXt (and the earlier FCViT) measured no better or slower
    return ConvNetBackbone(trunk, strided, mode, gamma, use_beta, head_norm=None, channels_last=True)


def _convnext(
    arch: str, mode: str, gamma: float | None, use_beta: bool, drop_path_rate: float, **kwargs: Any
) -> ConvNetBackbone:
    trunk = _timm_trunk(arch, drop_path_rate, **kwargs)
    # stride 32: 4x4/4 patchify stem, then a 2x2/2 conv opening each later stage
    strided = [trunk.stem[0]] + [stage.downsample[-1] for stage in list(trunk.stages)[1:]]
    return ConvNetBackbone(trunk, strided, mode, gamma, use_beta, head_norm="head.norm")


def _fcvit(
    arch: str, mode: str, gamma: float | None, use_beta: bool, drop_path_rate: float, **kwargs: Any
) -> ConvNetBackbone:
    trunk = fcvit.build_fcvit(arch, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    # stride 32: 7x7/4 stem, then the 3x3/2 conv of each downsampling embedding (network.1, .3, .5);
    # its forward_features ends with the final norm, so the pool sees the normed map
    strided = [trunk.patch_embed.proj] + [part.proj for part in trunk.network if isinstance(part, fcvit.Embedding)]
    return ConvNetBackbone(trunk, strided, mode, gamma, use_beta, head_norm=None)


def pooling_knobs(mode: str, gamma: float | str | None, use_beta: bool) -> tuple[float | str | None, bool]:
    """(gamma, use_beta) a backbone of ``mode`` has: SimPool's own in simpool mode; None and False
    in official mode, which pools without SimPool whatever the flags or a checkpoint's args say."""
    return (None, False) if mode == "official" else (gamma, use_beta)


def smallest_input(arch: str, patch_size: int | None = None) -> int | None:
    """The smallest image side ``arch`` takes: one patch for a ViT, one stride-32 cell for a convnet."""
    return patch_size if arch in VIT_ARCHS else ConvNetBackbone.min_input_size


def resolve_gamma(arch: str, gamma: float | str | None = "auto") -> float | None:
    """SimPool's exponent for ``arch``: ``gamma`` itself, or for ``'auto'`` 2.0 for
    convnets and None (plain attention average) for ViTs."""
    if gamma != "auto":
        return gamma
    return None if arch in VIT_ARCHS else CONVNET_GAMMA


def build_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    mode: str = "simpool",
    gamma: float | str | None = "auto",
    use_beta: bool = False,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Backbone ``arch`` (one of ``ARCHS``) pooled by ``mode`` (see the module docstring).

    ``patch_size`` and ``img_size`` apply to ViTs only (convnets take any input size);
    ``kwargs`` go to the family's constructor (``VisionTransformer``, ``timm.create_model``
    or ``fcvit.build_fcvit``).

    Example:
        >>> vit = build_backbone("vit_nano", patch_size=8, img_size=64)
        >>> vit.supports_masking, vit.embed_dim, vit.grid_size(64, 64)
        (True, 192, (8, 8))
        >>> cnn = build_backbone("convnext_tiny", mode="official")
        >>> cnn.supports_masking, cnn.embed_dim, cnn.grid_size(224, 224)
        (False, 768, (7, 7))
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gamma = resolve_gamma(arch, gamma)
    if arch in VIT_ARCHS:
        model = vits.build_vit(
            arch,
            patch_size=patch_size,
            img_size=img_size,
            mode=mode,
            gamma=gamma,
            use_beta=use_beta,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        model.supports_masking = True
    else:
        build = _resnet if arch.startswith("resnet") else _convnext if arch.startswith("convnext") else _fcvit
        model = build(arch, mode, gamma, use_beta, drop_path_rate, **kwargs)
    model.arch = arch
    return model


def feature_grid(backbone: nn.Module, height: int, width: int) -> tuple[int, ...]:
    """(h, w) of the token grid (ViT) or last feature map (convnet) that the pooling
    attention of a ``height`` x ``width`` input is laid out on."""
    return tuple(backbone.grid_size(height, width))


def upsample_attention(
    attention: torch.Tensor, grid: Sequence[int], size: Sequence[int], mode: str = "bilinear"
) -> torch.Tensor:
    """Pooling attention (B, h*w) laid out on ``grid`` = (h, w), resized to image
    resolution ``size`` = (H, W): (B, H, W), for visualisation.

    Example:
        >>> upsample_attention(torch.rand(2, 49), (7, 7), (224, 224)).shape
        torch.Size([2, 224, 224])
    """
    h, w = grid
    if attention.dim() != 2 or attention.shape[1] != h * w:
        raise ValueError(f"attention of shape {tuple(attention.shape)} does not lie on a {h}x{w} grid")
    maps = attention.float().reshape(-1, 1, h, w)
    align = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps, size=tuple(size), mode=mode, **align)[:, 0]


def supports_masking(backbone: nn.Module) -> bool:
    """Whether iBOT / AttMask masking applies: the backbone has patch tokens to mask."""
    return bool(getattr(backbone, "supports_masking", False))


def masking_off_message(arch: str) -> str:
    """What to log when masking is asked for a backbone without patch tokens."""
    return f"--arch {arch} has no patch tokens: masking (--pred_ratio) is turned off, the run is plain DINO"


def uses_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds any BatchNorm layer (which needs SyncBatchNorm under DDP)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def sync_batchnorm_supported(device: torch.device | str) -> bool:
    """SyncBatchNorm's forward only runs on GPU-like devices; on CPU (gloo) it raises
    ValueError once a process group exists, so there BatchNorm stays per rank."""
    return torch.device(device).type in ("cuda", "xpu", "hpu")
