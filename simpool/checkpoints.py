"""Backbone weights from any checkpoint: ours, exported, official DINO / iBOT / AttMask / SimPool.

One entry point, ``load_pretrained``, serves eval_knn, eval_linear, export and attention:
it reads the file safely (``torch.load(weights_only=True)``, or safetensors), picks the
state dict (``--checkpoint_key``), drops ``module.`` / ``backbone.`` prefixes and head
keys, works out the architecture (command line > stored args/metadata > the weights
themselves), builds the backbone with ``simpool.backbones.build_backbone`` (any of its
``ARCHS``: ViTs, ResNet-50, ConvNeXt, FCViT) and loads it **strictly**: any missing or
unexpected key or shape mismatch is one ``CheckpointError`` line naming them. Resizing a
ViT's ``pos_embed`` to another image size is the one adaptation allowed (logged).
``masked_embed`` (iBOT's mask token, absent from DINO checkpoints and unused at evaluation)
may be missing. Convnets have no patch size; their image size is raised to their smallest
input (32 px) when a smaller one is asked for (logged). A flat ResNet-50 state dict with
torchvision/timm names (e.g. DINO's ResNet-50 release) is read as ``trunk.*``, and so is a
released FCViT checkpoint (``patch_embed.*``, ``network.*``, ``norm.*``; its ``head.*``
classifier is dropped here, ``simpool.validate`` scores it); a file of this project's earlier
FCViT reconstruction is refused (``released_layouts``).

Example:
    >>> model, info = load_pretrained("output/demo/checkpoint.pth", checkpoint_key="teacher")
    >>> info["arch"], info["patch_size"], info["mode"], info["img_size"]
    ('vit_nano', 7, 'simpool', 28)
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simpool import backbones, utils
from simpool import vision_transformer as vits
from simpool.utils import CheckpointError, number

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger("simpool")

FORMAT = "simpool-backbone"  # marker of exported backbone files (simpool/export.py)
FORMAT_VERSION = 1
AUTO = "auto"  # --gamma default: read it from the checkpoint
OPTIONAL_KEYS = ("masked_embed",)  # may be absent (DINO checkpoints); unused at evaluation
# what main_dino.py's checkpoint.pth holds beyond the backbone: a run resumes from nothing less
TRAINING_KEYS = ("student", "teacher", "optimizer", "epoch")


def is_training_checkpoint(ckpt: object) -> bool:
    """Whether the loaded object ``ckpt`` is a checkpoint of main_dino.py (one a run resumes from)."""
    return isinstance(ckpt, dict) and all(k in ckpt for k in TRAINING_KEYS)


__all__ = [
    "load_pretrained",
    "read_checkpoint",
    "backbone_state_dict",
    "load_backbone_weights",
    "infer_arch",
    "is_convnet",
    "gamma_arg",
    "add_model_args",
    "released_layouts",
    "released_fcvit_to_backbone",
    "backbone_to_released_fcvit",
    "backbone_from_state",
    "init_backbone_from",
    "AUTO",
    "FORMAT",
    "FORMAT_VERSION",
    "TRAINING_KEYS",
    "CheckpointError",
    "is_training_checkpoint",
]


def _numpy_core() -> Any:
    return getattr(np, "_core", None) or np.core


# Plain data that official and our checkpoints pickle besides tensors: argparse.Namespace
# (official DINO/iBOT/SimPool 'args'), numpy scalars (learning rates stored as np.float64).
# None of them runs code when rebuilt; torch.load stays weights_only=True.
SAFE_GLOBALS = [argparse.Namespace, _numpy_core().multiarray.scalar, np.dtype] + sorted(
    {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}, key=lambda t: t.__name__
)


def gamma_arg(s: str | float | None) -> str | float | None:
    """argparse type for --gamma: 'auto', 'None', or a finite number > 0 (the exponent of a
    generalised mean: 0 divides by zero, NaN or inf makes every image's vector the same)."""
    if str(s).lower() == AUTO:
        return AUTO
    if str(s).lower() == "none":
        return None
    try:
        value = float(s)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected 'auto', 'None' or a finite number > 0, got {s!r}")
    return value


def checkpoint_key_arg(text: str) -> str:
    """argparse type of ``--checkpoint_key`` where one network is loaded (export, attention)."""
    if "," in text:
        raise argparse.ArgumentTypeError(
            f"expected one key such as 'teacher', got {text!r} (a comma-separated "
            "list is for eval_knn.py and eval_linear.py, which evaluate each in turn)"
        )
    return text


def checkpoint_keys_arg(text: str) -> str:
    """argparse type of the evaluations' ``--checkpoint_key``: one key, or AttMask's and iBOT's
    comma-separated list (``teacher,student``), each evaluated in turn; the text is kept as given."""
    keys = text.split(",")
    if len(keys) > 1 and (not all(keys) or len(set(keys)) < len(keys)):
        raise argparse.ArgumentTypeError(f"expected distinct, non-empty keys separated by commas, got {text!r}")
    return text


def add_model_args(parser: argparse.ArgumentParser, several_keys: bool = False) -> argparse._ArgumentGroup:
    """The backbone flags shared by eval_knn, eval_linear, export and attention;
    ``several_keys``: ``--checkpoint_key`` takes a comma-separated list (see
    ``simpool.evaluation.evaluate_each_key``)."""
    g = parser.add_argument_group("backbone")
    g.add_argument(
        "--pretrained_weights",
        default="",
        type=str,
        help="Checkpoint to evaluate: a training "
        "checkpoint.pth, an exported backbone (.pth/.safetensors), or an official DINO/iBOT/AttMask/"
        "SimPool checkpoint. Empty: random initialisation (a baseline).",
    )
    if several_keys:
        g.add_argument(
            "--checkpoint_key",
            default="teacher",
            type=checkpoint_keys_arg,
            help="Which network of a "
            "training checkpoint to evaluate ('teacher' or 'student'; ignored for exported and flat "
            "files), or several separated by commas as in AttMask and iBOT ('teacher,student'): each "
            "is evaluated in turn, with its results in a subfolder of --output_dir named after it.",
        )
    else:
        g.add_argument(
            "--checkpoint_key",
            default="teacher",
            type=checkpoint_key_arg,
            help="Which network of a "
            "training checkpoint to load ('teacher' or 'student'); ignored for exported and flat files.",
        )
    g.add_argument(
        "--arch",
        default=None,
        type=backbones.arch_arg,
        choices=list(backbones.ARCHS),
        help="Backbone architecture (a ViT, deit_tiny/deit_small meaning vit_tiny/vit_small as in DINO; "
        "resnet50, convnext_* or fcvit_*); default: from the checkpoint (its stored args, else its "
        "weights); vit_small for random init.",
    )
    g.add_argument(
        "--patch_size",
        default=None,
        type=number(int, low=1),
        help="Patch size (ViTs only); default: from the checkpoint (16 for random init).",
    )
    g.add_argument(
        "--mode",
        default=None,
        choices=backbones.MODES,
        help="'simpool' (SimPool pooling, no [CLS]) or "
        "'official' ([CLS] token for ViTs, the architecture's own pooling for convnets); default: from "
        "the checkpoint's weights (cls_token, or no simpool.* weights for convnets -> official).",
    )
    g.add_argument(
        "--gamma",
        default=AUTO,
        type=gamma_arg,
        help="SimPool's generalised-mean exponent: 'auto' "
        "reads it from the checkpoint (when it is not recorded: None for ViTs, 2.0 for convnets), "
        "'None' or a number overrides.",
    )
    g.add_argument(
        "--resample_native_pos",
        default=None,
        type=auto_bool_arg,
        help="SimPool ViTs: resample the "
        "position embeddings at every input size, the training size included, as the official SimPool "
        "code does (its models were trained that way; docs/evaluation.md). auto: on for checkpoints in "
        "the official SimPool layout, off for every other; True/False force it.",
    )
    return g


def auto_bool_arg(text: str) -> bool | None:
    """argparse type: 'auto' -> None (decide from the checkpoint), else a boolean flag."""
    return None if str(text).lower() == "auto" else utils.bool_flag(text)


def official_simpool_layout(ckpt: object, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` (a backbone's weights from ``ckpt``) comes from the official SimPool code:
    a SimPool ViT without this project's mask token, saved with the official scripts' argparse
    args or as a bare state dict. That code resamples its position embeddings even at the
    training size (its [CLS]-less token count never matches the grid check it inherited)."""
    if "patch_embed.proj.weight" not in state or "masked_embed" in state or "cls_token" in state:
        return False
    if not any(k.startswith("simpool.") for k in state):
        return False
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return isinstance(args, argparse.Namespace) or (args is None and ckpt.get("format") is None)


# ---------------------------------------------------------------- reading files
def read_checkpoint(path: str) -> Any:
    """The object stored in ``path``: ``torch.load(weights_only=True)`` for .pth files,
    safetensors for ``*.safetensors`` (returned as an exported-backbone dict). Anything
    unreadable (random bytes, truncated, a pickle with code) raises a one-line
    ``CheckpointError`` and nothing in the file is executed."""
    if not path:
        raise CheckpointError("no checkpoint path given")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if str(path).endswith(".safetensors"):
        return _read_safetensors(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return utils.load_checkpoint(path)


def _read_safetensors(path: str) -> dict[str, Any]:
    import json

    from safetensors import safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # header garbage, truncation: safetensors raises its own errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason[:200]})") from None
    meta = {}
    if "meta" in metadata:
        try:
            meta = json.loads(metadata["meta"])
        except ValueError:
            raise CheckpointError(f"{path}: its 'meta' metadata is not valid JSON") from None
    return {
        "format": metadata.get("format", "safetensors"),
        "version": int(metadata.get("version", 0) or 0),
        "meta": meta,
        "state_dict": state,
    }


# ---------------------------------------------------------------- picking the backbone
def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _args_dict(args: object) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def backbone_state_dict(
    ckpt: object, checkpoint_key: str | None = "teacher", path: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state_dict, meta, description) of the backbone stored in ``ckpt``.

    Exported files carry their metadata; training checkpoints (ours or official) hold
    ``ckpt[checkpoint_key]`` with ``module.``/``backbone.`` prefixes and head keys, and
    their training ``args``; iBOT releases use ``state_dict``; flat backbone files are
    a state dict themselves. Prefixes are stripped and non-backbone keys dropped."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    if ckpt.get("format") in (FORMAT, "safetensors") and isinstance(ckpt.get("state_dict"), dict):
        meta = dict(ckpt.get("meta") or {})
        return _strip_prefixes(ckpt["state_dict"], path), meta, "exported backbone"
    if {"weight", "bias", "classes"} <= ckpt.keys() or {"sweep", "config"} <= ckpt.keys():
        # eval_linear.py's linear_head.pth / linear_checkpoint.pth: say so, and name their backbone
        config = ckpt.get("config") or ckpt
        backbone = config.get("pretrained_weights") or "a random initialisation"
        raise CheckpointError(
            f"{path} holds linear-probe heads saved by eval_linear.py, not a backbone; "
            f"they were trained on the features of {backbone}"
        )
    meta = _args_dict(ckpt.get("args"))
    if "epoch" in ckpt and isinstance(ckpt["epoch"], int):
        meta.setdefault("epoch", ckpt["epoch"])
    if checkpoint_key and isinstance(ckpt.get(checkpoint_key), dict):
        state, what = ckpt[checkpoint_key], f"'{checkpoint_key}'"
    elif _is_state_dict(ckpt):
        state, what = ckpt, "flat state dict"
    else:
        holds = ", ".join(sorted(str(k) for k in ckpt)[:12])
        # the default key falls back to the other releases' names; a key the user chose does not
        fallbacks = ("state_dict", "model", "teacher", "state_dict_ema") if checkpoint_key in (None, "teacher") else ()
        for key in fallbacks:
            if isinstance(ckpt.get(key), dict):
                state, what = ckpt[key], f"'{key}'"
                break
        else:
            raise CheckpointError(
                f"{path} has no '{checkpoint_key}' entry (it holds: {holds}); choose one with --checkpoint_key"
            )
        logger.info(f"{path}: no '{checkpoint_key}' entry; using {what}.")
    if not _is_state_dict(state):
        raise CheckpointError(f"{path} [{what}] is not a state dict of tensors")
    return _strip_prefixes(state, path), meta, what


def _strip_prefixes(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        dropped = sorted({k.split(".")[0] for k in state if not k.startswith("backbone.")})
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if dropped:
            logger.info(f"{path}: dropped non-backbone keys ({', '.join(dropped)}.*).")
    heads = [k for k in state if k.startswith("head.") or k.startswith("fc_norm.")]
    if heads:
        logger.info(f"{path}: dropped {len(heads)} head keys.")
        state = {k: v for k, v in state.items() if k not in heads}
    return state


# ---------------------------------------------------------------- architecture
CONVNET_ARCHS = backbones.TIMM_ARCHS + backbones.FCVIT_ARCHS
# The first key of each convnet family's trunk: which candidates infer_arch compares against.
CONVNET_FAMILIES = {
    "trunk.conv1.weight": ("resnet",),
    "trunk.stem.0.weight": ("convnext",),
    "trunk.patch_embed.proj.weight": ("fcvit",),
}


def is_convnet(arch: str | None) -> bool:
    return arch in CONVNET_ARCHS


@functools.lru_cache(maxsize=None)
def _trunk_signature(arch: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of ``arch``'s trunk weights, from a build on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = backbones.build_backbone(arch, mode="official")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("trunk.")}


def _convnet_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The convnet whose trunk weights have exactly the names and shapes of ``state``'s, or None."""
    trunk = {k: tuple(v.shape) for k, v in state.items() if k.startswith("trunk.")}
    families = next((f for key, f in CONVNET_FAMILIES.items() if key in trunk), ())
    for arch in CONVNET_ARCHS:
        if arch.startswith(families) and _trunk_signature(arch) == trunk:
            return arch
    return None


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights themselves say: arch, patch_size, mode, use_beta, img_size (ViTs),
    or arch, embed_dim, mode, use_beta (convnets: ``trunk.*`` weights)."""
    out = {}
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        out["patch_size"] = int(w.shape[-1])
        embed_dim = int(w.shape[0])
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        names = [n for n, (d, L, _) in vits.ARCHS.items() if d == embed_dim and L == depth]
        if names:
            out["arch"] = names[0]
        out["embed_dim"], out["depth"] = embed_dim, depth
    elif any(k.startswith("trunk.") for k in state):
        out["convnet"] = True
        arch = _convnet_arch(state)
        if arch is not None:
            out["arch"] = arch
    if "cls_token" in state:
        out["mode"] = "official"
    elif any(k.startswith("simpool.") for k in state):
        out["mode"] = "simpool"
    elif out.get("convnet"):
        out["mode"] = "official"  # a convnet without SimPool pools with its own global average
    out["use_beta"] = "simpool.beta" in state
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "patch_size" in out:
        n = pos.shape[1] - (1 if out.get("mode") == "official" else 0)
        side = math.isqrt(n)
        if side * side == n:
            out["img_size"] = side * out["patch_size"]
    return out


def _resolve(explicit: Any, *candidates: Any, default: Any = None) -> Any:
    if explicit is not None:
        return explicit
    for c in candidates:
        if c is not None:
            return c
    return default


def load_pretrained(
    path: str,
    checkpoint_key: str | None = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    mode: str | None = None,
    gamma: str | float | None = AUTO,
    image_size: int | None = None,
    use_beta: bool | None = None,
    resize_pos_embed: bool = False,
    resample_native_pos: bool | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the backbone stored in ``path`` and load it strictly; ``(model, info)``.

    ``image_size`` is the size the model will see; None keeps the checkpoint's. A ViT keeps
    the checkpoint's position grid and its forward interpolates from it for each input size,
    as DINO's evaluation does (one interpolation for any shape; a non-square input from a
    resized square grid would take two). ``resize_pos_embed=True`` resizes pos_embed to
    ``image_size`` instead, for a model stored or exported at that size.
    ``info`` holds arch, patch_size, mode, gamma, use_beta, img_size (training size),
    image_size, embed_dim, depth, num_heads, data_path (when recorded), epoch, source. An
    empty ``path`` gives a randomly initialised model and a loud warning.
    ``resample_native_pos`` (None: from the checkpoint, see ``official_simpool_layout``; an
    exported file records it) makes a SimPool ViT resample its position embeddings at every
    input size, as the official SimPool code does; ``info['resample_native_pos']`` says which."""
    if not path:
        arch, mode = arch or "vit_small", mode or "simpool"
        patch_size = None if is_convnet(arch) else patch_size or 16
        gamma = backbones.resolve_gamma(arch, gamma)  # 'auto': None for ViTs, 2.0 for convnets
        gamma, use_beta = backbones.pooling_knobs(mode, gamma, use_beta)  # info and logs say what the model has
        image_size = _evaluation_size(arch, patch_size, image_size or 224)
        logger.warning(
            "WARNING: no --pretrained_weights given: evaluating a RANDOMLY INITIALISED "
            f"{_describe(arch, patch_size, mode)}. Its numbers are a chance-level baseline, not a result."
        )
        model = backbones.build_backbone(
            arch, patch_size=patch_size, img_size=image_size, mode=mode, gamma=gamma, use_beta=bool(use_beta)
        )
        info = dict(
            arch=arch,
            patch_size=patch_size,
            mode=mode,
            gamma=gamma,
            use_beta=bool(use_beta),
            img_size=image_size,
            image_size=image_size,
            data_path=None,
            epoch=None,
            source="random init",
        )
        return model.eval(), _with_dims(info, model)

    ckpt = read_checkpoint(path)
    state, meta, what = backbone_state_dict(ckpt, checkpoint_key, path)
    state = released_layouts(state, path)
    found = infer_arch(state)
    arch = _resolve(arch, meta.get("arch") if meta.get("arch") in backbones.ARCHS else None, found.get("arch"))
    if arch is None and isinstance(meta.get("arch"), str) and "patch_embed.proj.weight" not in state:
        raise CheckpointError(
            f"{path} holds a {meta['arch']} backbone, which is none of the architectures the "
            f"tools build ({', '.join(backbones.ARCHS)}); pass --arch if it is one of them"
        )
    if arch is None and found.get("convnet"):
        raise CheckpointError(
            f"{path}: cannot tell the architecture (its trunk.* weights match none of "
            f"{', '.join(CONVNET_ARCHS)}); pass --arch"
        )
    if arch is None:
        raise CheckpointError(
            f"{path}: cannot tell the architecture (embed_dim {found.get('embed_dim')}, "
            f"depth {found.get('depth')} match none of {', '.join(vits.ARCHS)}); pass --arch"
        )
    convnet = is_convnet(arch)
    if convnet and patch_size is not None:
        logger.info(f"--patch_size {patch_size} ignored: {arch} has no patches.")
    patch_size = None if convnet else _resolve(patch_size, found.get("patch_size"), meta.get("patch_size"), default=16)
    mode = _resolve(
        mode, found.get("mode"), meta.get("mode") if meta.get("mode") in backbones.MODES else None, default="simpool"
    )
    use_beta = _resolve(use_beta, found.get("use_beta"), default=False)
    if gamma == AUTO:
        if "gamma" in meta:
            # main_dino stores the number it used, or (older runs) 'auto': None for ViTs, 2.0 for convnets
            stored = meta["gamma"]
            gamma = (
                backbones.resolve_gamma(arch, AUTO)
                if stored == AUTO
                else None
                if stored in (None, "None", "none")
                else stored
            )
            if gamma is not None and not isinstance(gamma, (int, float)):
                raise CheckpointError(f"{path} records gamma {gamma!r}, not a number; pass --gamma")
        else:
            gamma = backbones.resolve_gamma(arch, AUTO)
            if mode == "simpool" and not convnet:
                logger.warning(
                    f"{path} does not record SimPool's gamma; using None (plain attention average). "
                    "Pass --gamma 1.25 for checkpoints of the official SimPool ViT-S recipe."
                )
            elif mode == "simpool":
                logger.warning(
                    f"{path} does not record SimPool's gamma; using {gamma} (the convnet default). "
                    "Pass --gamma if it was trained with another."
                )
    gamma, use_beta = backbones.pooling_knobs(mode, gamma, use_beta)
    img_size = _resolve(meta.get("img_size"), meta.get("global_crops_size"), found.get("img_size"), default=224)
    image_size = _evaluation_size(arch, patch_size, image_size or img_size, f" of {path}")
    resample = False
    if not convnet and mode == "simpool":
        detected = official_simpool_layout(ckpt, state)
        resample = bool(_resolve(resample_native_pos, meta.get("resample_native_pos"), detected))
    # without the resize: the grid the weights hold (what their pos_embed says, else the recorded size);
    # a model that resamples at every size keeps that grid too, its forward resamples from it
    build_size = image_size if resize_pos_embed and not resample else found.get("img_size") or img_size
    model = _build_uninitialised(
        arch, patch_size=patch_size, img_size=build_size, mode=mode, gamma=gamma, use_beta=use_beta
    )
    desc = _describe(arch, patch_size, mode)
    load_backbone_weights(model, state, f"{path} [{what}]", desc, weights_arch=found.get("arch"))
    if resample:
        model.resample_native_pos = True
        why = (
            "--resample_native_pos True"
            if resample_native_pos
            else "records resample_native_pos"
            if meta.get("resample_native_pos")
            else "is in the official SimPool layout"
        )
        logger.info(
            f"{path} {why}: its position embeddings are resampled at every input size, the training size "
            "included, as the official SimPool code does (--resample_native_pos False: use them as stored)."
        )
    info = dict(
        arch=arch,
        patch_size=patch_size,
        mode=mode,
        gamma=gamma,
        use_beta=use_beta,
        img_size=img_size,
        image_size=image_size,
        data_path=meta.get("data_path"),
        epoch=meta.get("epoch"),
        entry=what.strip("'"),
        source=f"{path} [{what}]",
        resample_native_pos=resample,
    )
    logger.info(
        f"Loaded {desc}, gamma {gamma}, from {info['source']}"
        + (f" (epoch {info['epoch']})" if info["epoch"] is not None else "")
        + "."
    )
    return model.eval(), _with_dims(info, model)


def _describe(arch: str, patch_size: int | None, mode: str) -> str:
    """'vit_nano/7 (simpool)' for ViTs, 'resnet50 (simpool)' for convnets."""
    return f"{arch} ({mode})" if is_convnet(arch) else f"{arch}/{patch_size} ({mode})"


def _evaluation_size(arch: str, patch_size: int | None, image_size: int, of: str = "") -> int:
    """``image_size``, raised to the convnet's smallest input (one stride-32 cell) when below it;
    one below a ViT's patch is an error."""
    if patch_size and image_size < patch_size:
        raise CheckpointError(f"--image_size {image_size} is smaller than one {patch_size}-pixel patch{of}")
    smallest = backbones.smallest_input(arch, patch_size) if is_convnet(arch) else 0
    if image_size < smallest:
        logger.info(
            f"{arch} needs inputs of at least {smallest}x{smallest} pixels: images are resized to "
            f"{smallest} px instead of {image_size} px."
        )
        return smallest
    return image_size


def _timm_resnet_layout(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """A flat ResNet-50 state dict under torchvision/timm names (``conv1.weight``, ``layer1.*``;
    DINO's ResNet-50 release, and SimPool's, whose ``simpool.*`` pooling sits beside the layers)
    as our ``trunk.*`` names, ``simpool.*`` kept, its classifier (``fc.*``) dropped."""
    if (
        "conv1.weight" not in state
        or "layer4.0.conv1.weight" not in state
        or any(k.startswith(("trunk.", "patch_embed.")) for k in state)
    ):
        return state
    fc = [k for k in state if k.startswith("fc.")]
    if fc:
        logger.info(f"{path}: dropped the classifier ({', '.join(fc)}).")
    return {(k if k.startswith("simpool.") else f"trunk.{k}"): v for k, v in state.items() if k not in fc}


# the earlier fcvit.py (a reconstruction from the paper, not the released network): keys of its token mixer
OLD_FCVIT_KEY = re.compile(r"^trunk\.stages\.\d+\.blocks\.\d+\.token_mixer\.(sim_scale|sim_shift|reduce\.weight)$")
RELEASED_FCVIT_KEY = "network.0.0.token_mixer.gc1.rescale_weight"  # a key only the released FCViT has
RELEASED_FCVIT_ROOTS = ("patch_embed.", "network.", "norm.")  # its trunk; "head." is its classifier


def released_layouts(state: dict, path: str = "checkpoint") -> dict:
    """``state`` under the wrapper's ``trunk.*`` names when it is in a released layout (timm's
    ResNet-50 names, the released FCViT's); a file of the earlier FCViT reconstruction is refused."""
    _refuse_old_fcvit(state, path)
    if RELEASED_FCVIT_KEY in state:
        return released_fcvit_to_backbone(state, path)
    return _timm_resnet_layout(state, path)


def _refuse_old_fcvit(state: dict, path: str) -> None:
    """The first FCViT of this project was reconstructed from the paper and is another network than
    the released one (other blocks, mixers and names): its weights fit no model built now."""
    old = next((k for k in state if OLD_FCVIT_KEY.match(k)), None)
    if old is not None:
        raise CheckpointError(
            f"{path} holds an FCViT of this project's earlier layout ({old}): that was a "
            "reconstruction from the paper, not the released FCViT, and no model built now takes "
            "its weights; retrain it (main_dino.py --arch fcvit_*) or re-export it from such a run"
        )


def released_fcvit_to_backbone(state: dict, path: str = "checkpoint") -> dict:
    """A released FCViT state dict (``patch_embed.*``, ``network.*``, ``norm.*``; ``simpool.*`` may
    sit beside them) under the wrapper's names: ``trunk.<released name>``, ``simpool.*`` kept. Its
    classifier ``head.*`` has no place in a backbone and is dropped (logged); any other key is a
    one-line CheckpointError. ``backbone_to_released_fcvit`` is the way back.

    Example:
        >>> list(released_fcvit_to_backbone({"norm.weight": torch.ones(2), "head.bias": torch.zeros(5)}))
        ['trunk.norm.weight']
    """
    head = [k for k in state if k.startswith("head.")]
    if head:
        logger.info(f"{path}: dropped the classifier ({', '.join(head)}).")
    other = [k for k in state if k not in head and not k.startswith(RELEASED_FCVIT_ROOTS + ("simpool.",))]
    if other:
        raise CheckpointError(f"{path}: keys that are not the released FCViT's: {_names(other)}")
    return {(k if k.startswith("simpool.") else f"trunk.{k}"): v for k, v in state.items() if k not in head}


def backbone_to_released_fcvit(state: dict, head: dict | None = None) -> dict:
    """An FCViT backbone's state dict (``trunk.*``, ``simpool.*``) under the released names
    (``patch_embed.*``, ``network.*``, ``norm.*``), e.g. to hand the trunk to the authors' code;
    ``simpool.*`` stays beside it (drop it for their code, which has no SimPool), ``head``
    (``{"weight", "bias"}`` of a classifier) becomes ``head.*``. Any other key is a ValueError.

    Example:
        >>> state = backbones.build_backbone("fcvit_tiny", mode="official").state_dict()
        >>> backbone_to_released_fcvit(state)["patch_embed.proj.weight"].shape
        torch.Size([32, 3, 7, 7])
    """
    other = [k for k in state if not k.startswith(("trunk.", "simpool."))]
    trunk = {k[len("trunk.") :] for k in state if k.startswith("trunk.")}
    foreign = sorted(k for k in trunk if not k.startswith(RELEASED_FCVIT_ROOTS))
    if other or foreign:
        raise ValueError(f"not an FCViT backbone's state dict: {_names(other + foreign)}")
    out = {(k[len("trunk.") :] if k.startswith("trunk.") else k): v for k, v in state.items()}
    out.update({f"head.{k}": v for k, v in (head or {}).items()})
    return out


def backbone_from_state(
    state: dict, source: str, arch: str | None = None, gamma: str | float | None = AUTO
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The backbone that ``state`` (wrapper names: ``trunk.*``/``simpool.*``, or ViT names) holds,
    built in the mode its weights say and loaded strictly, in eval mode, with ``{arch,
    patch_size, mode, gamma}``: for tools that read weights which are not a backbone file of
    their own (a classifier's trunk, ``simpool.validate``). ``gamma`` 'auto': 2.0 for convnets,
    None for ViTs."""
    found = infer_arch(state)
    arch = arch or found.get("arch")
    if arch is None:
        raise CheckpointError(f"{source}: cannot tell the architecture from its weights; pass --arch")
    patch_size = None if is_convnet(arch) else found.get("patch_size", 16)
    mode = found.get("mode", "simpool")
    gamma = backbones.resolve_gamma(arch, gamma) if mode == "simpool" else None
    model = _build_uninitialised(
        arch,
        patch_size=patch_size,
        img_size=found.get("img_size") or 224,
        mode=mode,
        gamma=gamma,
        use_beta=found["use_beta"],
    )
    load_backbone_weights(model, state, source, _describe(arch, patch_size, mode), weights_arch=found.get("arch"))
    return model.eval(), dict(arch=arch, patch_size=patch_size, mode=mode, gamma=gamma)


def init_backbone_from(backbone: torch.nn.Module, path: str, checkpoint_key: str = "teacher") -> torch.nn.Module:
    """Start ``backbone`` (built by ``build_backbone``, any mode) from the weights in ``path``
    (any layout ``load_pretrained`` reads, e.g. a released FCViT checkpoint): every weight the
    checkpoint has must fit strictly; only a SimPool layer the checkpoint lacks keeps its fresh
    initialisation, which one log line says. Returns the backbone."""
    state, _, what = backbone_state_dict(read_checkpoint(path), checkpoint_key, path)
    state = released_layouts(state, path)
    own = backbone.state_dict()
    new = sorted(k for k in own if k.startswith("simpool.") and k not in state)
    source = f"{path} [{what}]"
    load_backbone_weights(
        backbone,
        {**state, **{k: own[k] for k in new}},
        source,
        getattr(backbone, "arch", None),
        weights_arch=infer_arch(state).get("arch"),
    )
    pooling = (
        f"its SimPool layer is new ({len(new)} tensors, not in the checkpoint)"
        if new
        else "its pooling from the checkpoint too"
    )
    logger.info(f"Started {getattr(backbone, 'arch', type(backbone).__name__)} from the trunk in {source}; {pooling}.")
    return backbone


def _build_uninitialised(arch: str, **kwargs: Any) -> torch.nn.Module:
    """The backbone on the meta device (no random initialisation: every weight is loaded next,
    with ``assign``); a plain CPU build where construction cannot run on meta tensors, or
    where the model holds buffers that the state dict does not carry."""
    try:
        with torch.device("meta"):
            model = backbones.build_backbone(arch, **kwargs)
        persistent = set(model.state_dict())
        if all(name in persistent for name, _ in model.named_buffers()):
            return model
    except (NotImplementedError, RuntimeError):
        pass
    # The random initialisation is thrown away; on one thread it costs far less on a busy
    # machine (vit_nano: 0.08 s instead of 1.3 s measured on 2 oversubscribed cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return backbones.build_backbone(arch, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _with_dims(info: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    if info["arch"] in vits.ARCHS:
        embed_dim, depth, num_heads = vits.ARCHS[info["arch"]]
    else:  # convnets: no blocks of one width, no heads
        embed_dim, depth, num_heads = model.embed_dim, None, None
    info.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    return info


# ---------------------------------------------------------------- strict loading
def _names(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_backbone_weights(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    desc: str | None = None,
    weights_arch: str | None = None,
) -> torch.nn.Module:
    """Load ``state`` into ``model`` strictly; the only adaptations are resizing
    ``pos_embed`` to the model's grid and keeping the model's own ``masked_embed``
    when the checkpoint has none. Anything else that does not fit raises one
    ``CheckpointError`` line naming the missing/unexpected keys and shape mismatches
    (``weights_arch``, what the weights look like, goes into the hint when a convnet
    is involved)."""
    own = model.state_dict()
    on_meta = any(t.is_meta for t in own.values())  # built without initialisation: take the tensors as they are
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    desc = desc or type(model).__name__
    missing = [k for k in own if k not in state and k not in OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched == ["pos_embed"] and not missing and not unexpected:  # everything else fits: another image size
        state["pos_embed"] = _resize_pos_embed(state["pos_embed"], own["pos_embed"], model, source)
        mismatched = [k for k in mismatched if state[k].shape != own[k].shape]
    mismatched = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})" for k in mismatched]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_names(mismatched, 3)}")
        hint = ""
        convnet = hasattr(model, "trunk")
        if any(k.startswith("trunk.") for k in missing + unexpected):  # a ViT for a convnet or the other way
            hint = f" (the weights are a {weights_arch}: check --arch)" if weights_arch else " (check --arch)"
        elif "cls_token" in unexpected:
            hint = " (a [CLS] checkpoint: try --mode official)"
        elif "cls_token" in missing and any(k.startswith("simpool.") for k in unexpected):
            hint = " (a SimPool checkpoint: try --mode simpool)"
        elif any(k.startswith("patch_embed") for k in (m.split()[0] for m in mismatched)):
            hint = " (check --patch_size / --arch)"
        elif convnet and any(k.startswith("simpool.") for k in unexpected):
            hint = " (a SimPool checkpoint: try --mode simpool)"
        elif convnet and any(k.startswith("simpool.") for k in missing):
            hint = " (no SimPool weights: try --mode official)"
        elif convnet and mismatched:
            hint = f" (the weights are a {weights_arch}: check --arch)" if weights_arch else " (check --arch)"
        raise CheckpointError(f"{source} does not fit {desc}: {'; '.join(parts)}{hint}")
    for k in OPTIONAL_KEYS:
        if k in own and k not in state:
            state[k] = torch.zeros(own[k].shape) if own[k].is_meta else own[k]  # masked_embed starts at zero
            logger.info(f"{source}: no {k} in the checkpoint; using a zero one (unused at evaluation).")
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def _resize_pos_embed(pos: torch.Tensor, target: torch.Tensor, model: torch.nn.Module, source: str) -> torch.Tensor:
    prefix = getattr(model, "num_prefix_tokens", 0)
    n_old = pos.shape[1] - prefix
    old, new = math.isqrt(max(n_old, 0)), model.patch_embed.grid_size
    if pos.ndim != 3 or pos.shape[2] != target.shape[2] or old * old != n_old or n_old <= 0:
        return pos  # not a resizable grid: reported as a shape mismatch
    resized = vits.interpolate_pos_embed(pos.float(), new, num_prefix_tokens=prefix).to(pos.dtype)
    logger.info(
        f"{source}: resized pos_embed from a {old}x{old} to a {new[0]}x{new[1]} patch grid "
        f"(image size {old * model.patch_size} -> {new[0] * model.patch_size})."
    )
    assert resized.shape == target.shape, (resized.shape, target.shape)
    return resized
