"""Export a trained backbone (no head) with its architecture metadata, and load it back.

    python -m simpool.export --checkpoint output/checkpoint.pth --checkpoint_key teacher --output backbone.pth
    python -m simpool.export --checkpoint output/checkpoint.pth --output backbone.safetensors

The file holds the backbone's state dict and ``meta`` (format version, arch, patch_size,
mode, gamma, use_beta, img_size, embed_dim, depth, num_heads, data_path, source). A .pth
file is ``{"format": "simpool-backbone", "version", "meta", "state_dict"}`` written
atomically; a .safetensors file stores the tensors and, as string metadata, ``format``,
``version`` and ``meta`` (JSON). Loading back is strict (see simpool/checkpoints.py).

Every architecture of ``simpool.backbones.ARCHS`` exports. Convnets (resnet50, convnext_*,
fcvit_*) carry no patch_size, depth or num_heads; their ``img_size`` is only the training
crop size, the default size of later evaluations (they take any input of 32 px or more).

The ViT block weights are timm's: ``to_timm_state_dict`` drops ``simpool.*`` and
``masked_embed`` and ``build_timm_vit`` makes the matching ``timm`` VisionTransformer,
whose ``forward_features`` then equals our ``forward_features()['patch_tokens']``. That
timm route is for ViTs only; a loaded convnet's ``model.trunk`` is itself the timm model
(ResNet-50, ConvNeXt) or the released FCViT, under timm's own / the released names
(``simpool.checkpoints.backbone_to_released_fcvit`` writes an FCViT's weights in its released layout).

Example:
    >>> meta = export_backbone("output/demo/checkpoint.pth", "backbone.safetensors")
    >>> model = load_backbone("backbone.safetensors")
    >>> timm_vit = build_timm_vit(meta)
    >>> timm_vit.load_state_dict(to_timm_state_dict(model))
    <All keys matched successfully>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from timm.models.vision_transformer import VisionTransformer

from simpool import utils
from simpool import vision_transformer as vits
from simpool.checkpoints import (
    AUTO,
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    add_model_args,
    is_convnet,
    is_training_checkpoint,
    load_pretrained,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

logger = logging.getLogger("simpool")
__all__ = ["export_backbone", "load_backbone", "to_timm_state_dict", "build_timm_vit"]
META_KEYS = (
    "arch",
    "patch_size",
    "mode",
    "gamma",
    "use_beta",
    "img_size",
    "embed_dim",
    "depth",
    "num_heads",
    "data_path",
    "epoch",
    "resample_native_pos",
)
VIT_ONLY_KEYS = ("patch_size", "depth", "num_heads", "resample_native_pos")  # not in a convnet's metadata


def export_backbone(
    checkpoint: str,
    output: str,
    checkpoint_key: str | None = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    mode: str | None = None,
    gamma: str | float | None = AUTO,
    resample_native_pos: bool | None = None,
) -> dict[str, Any]:
    """Write the backbone of ``checkpoint`` to ``output`` (.pth or .safetensors); returns its metadata.
    The weights go through a strict load first, so a file that exports also loads."""
    model, info = load_pretrained(
        checkpoint,
        checkpoint_key,
        arch=arch,
        patch_size=patch_size,
        mode=mode,
        gamma=gamma,
        resample_native_pos=resample_native_pos,
    )
    meta = {k: info.get(k) for k in META_KEYS if not (is_convnet(info["arch"]) and k in VIT_ONLY_KEYS)}
    # the entry the weights came from: --checkpoint_key, a fallback, or "exported backbone"
    meta.update(format_version=FORMAT_VERSION, source=f"{os.path.basename(checkpoint)} [{info['entry']}]")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CheckpointError(f"--output folder {folder} does not exist")
    if os.path.isfile(output) and _is_training_checkpoint(output):
        # the export keeps the backbone alone: the student, optimizer and resume state would be lost
        raise CheckpointError(
            f"--output {output} is a training checkpoint; writing the backbone over it would "
            "lose the run's resume state: choose another file name"
        )
    if str(output).endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"format": FORMAT, "version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
        try:  # the bytes written as a checkpoint is: temp file, fsync, rename
            utils.write_atomically(output, lambda f: f.write(data))
        except OSError as e:
            raise CheckpointError(f"could not write {output} ({e.strerror or e})") from None
    else:
        utils.save_checkpoint({"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "state_dict": state}, output)
    return meta


def _is_training_checkpoint(path: str) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file (a .safetensors, anything else): not a run's checkpoint
        return False
    return is_training_checkpoint(state)


def load_backbone(
    path: str, checkpoint_key: str | None = "teacher", image_size: int | None = None, **overrides: Any
) -> torch.nn.Module:
    """The backbone in ``path`` (exported or any checkpoint ``load_pretrained`` reads),
    loaded strictly, in eval mode, its pos_embed resized to ``image_size`` when given; its
    metadata is ``model.pretrained_info``."""
    model, info = load_pretrained(path, checkpoint_key, image_size=image_size, resize_pos_embed=True, **overrides)
    model.pretrained_info = info
    return model


def to_timm_state_dict(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT's weights under timm's VisionTransformer names: identical for
    patch_embed / pos_embed / cls_token / blocks / norm; SimPool and the mask token
    have no timm counterpart and are dropped. ViTs only (a convnet's ``trunk`` is
    already a timm model: ``model.trunk.state_dict()``)."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    if any(k.startswith("trunk.") for k in state):
        raise ValueError(
            "to_timm_state_dict is for ViTs; a convnet's weights are timm's already: model.trunk.state_dict()"
        )
    return {k: v for k, v in state.items() if not k.startswith("simpool.") and k != "masked_embed"}


def build_timm_vit(meta: Mapping[str, Any]) -> VisionTransformer:
    """The timm VisionTransformer whose weights ``to_timm_state_dict`` fills: no head,
    no pooling, a class token only in official mode; LayerNorm eps 1e-6 everywhere, as
    ours (and DINO's). ViTs only."""
    if meta.get("arch") not in vits.ARCHS:
        raise ValueError(
            f"build_timm_vit builds ViTs only, not {meta.get('arch')}; a convnet's model.trunk is "
            "already the timm model"
        )
    embed_dim, depth, num_heads = vits.ARCHS[meta["arch"]]
    model = VisionTransformer(
        img_size=meta["img_size"],
        patch_size=meta["patch_size"],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=meta["mode"] == "official",
        global_pool="",
        num_classes=0,
    )
    return model.eval()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simpool.export",
        description="Export a SimPool-SSL backbone (no head) with its metadata: any --arch (ViTs, resnet50, "
        "convnext_*, fcvit_*); the timm ViT helpers (to_timm_state_dict, build_timm_vit) are for ViTs only",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=str,
        help="Training checkpoint (or any checkpoint "
        "eval_knn reads: official DINO/iBOT/AttMask/SimPool, or an exported backbone).",
    )
    p.add_argument("--output", required=True, type=str, help="Output file: *.pth (torch) or *.safetensors.")
    g = add_model_args(p)
    # --pretrained_weights is the eval scripts' spelling of --checkpoint; here it is not used.
    for action in g._group_actions:
        if action.dest == "pretrained_weights":
            action.help = argparse.SUPPRESS
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    utils.setup_logging()
    utils.run_command(run, args)


def run(args: argparse.Namespace) -> None:
    meta = export_backbone(
        args.checkpoint,
        args.output,
        args.checkpoint_key,
        args.arch,
        args.patch_size,
        args.mode,
        args.gamma,
        args.resample_native_pos,
    )
    size = os.path.getsize(args.output) / 2**20
    name = meta["arch"] if meta.get("patch_size") is None else f"{meta['arch']}/{meta['patch_size']}"
    logger.info(
        f"Exported {name} ({meta['mode']}, gamma {meta['gamma']}, {meta['img_size']}px, embed_dim "
        f"{meta['embed_dim']}) from {os.path.join(os.path.dirname(args.checkpoint), meta['source'])} "
        f"to {args.output} ({size:.1f} MiB, format v{FORMAT_VERSION})."
    )


if __name__ == "__main__":
    main()
