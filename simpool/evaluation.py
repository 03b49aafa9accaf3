"""Shared plumbing of the evaluation CLIs (eval_knn, eval_linear): the train/val splits,
a collate that survives unreadable files, the frozen feature vector and its flags,
precision, and the one-line error exit.

Example:
    >>> train, val = build_eval_splits("fashion-mnist", image_size=28, subset=10, val_subset=5)
    >>> len(train), len(val), train.classes[0]
    (100, 50, 'T-shirt/top')
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.utils.data import default_collate

from simpool import utils
from simpool.checkpoints import is_convnet
from simpool.data import FASHION_MNIST, build_dataset, check_same_classes, eval_transform, is_in_memory
from simpool.precision import PRECISIONS, PrecisionError, log_precision, resolve_precision
from simpool.utils import number, subset_size

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from simpool.data import InMemoryImages, SafeImageFolder

logger = logging.getLogger("simpool")
__all__ = [
    "EvalError",
    "build_eval_splits",
    "tolerant_collate",
    "drop_unreadable",
    "online_knn_splits",
    "resolve_eval_precision",
    "add_precision_arg",
    "run_main",
    "is_in_memory",
    "FrozenFeatures",
    "add_feature_args",
    "add_window_size_arg",
    "avgpool_mode",
    "log_feature_choice",
    "evaluate_each_key",
    "weights_fingerprint",
    "load_saved_head",
]


class EvalError(utils.UserError, ValueError):
    """A user-facing problem with the evaluation's inputs; its message is one line."""


def build_eval_splits(
    data_path: str,
    image_size: int,
    subset: int | None = -1,
    val_subset: int | None = -1,
    train_transform: Callable[[Any], Any] | None = None,
    subset_start: int = 0,
) -> tuple[InMemoryImages | SafeImageFolder, InMemoryImages | SafeImageFolder]:
    """(train, val) datasets: Fashion-MNIST's train/test splits, or ``DATA/train`` and
    ``DATA/val`` ImageFolders (val resized and centre-cropped to ``image_size``; train
    with ``train_transform``, default the same as val). ``subset``/``val_subset`` > 0
    keep that many images per class (the training ones from ``subset_start`` on)."""
    val_tf = eval_transform(image_size)
    train = build_dataset(data_path, "train", subset, transform=train_transform or val_tf, subset_start=subset_start)
    val = build_dataset(data_path, "test" if data_path == FASHION_MNIST else "val", val_subset, transform=val_tf)
    check_same_classes(train, val, data_path)
    return train, val


def online_knn_splits(
    data_path: str, image_size: int, subset: int | None = -1
) -> tuple[InMemoryImages | SafeImageFolder, InMemoryImages | SafeImageFolder] | None:
    """Train (memory) and evaluation splits of main_dino.py's online k-NN; None, with a warning, when
    ``data_path`` has no evaluation split."""
    if data_path != FASHION_MNIST and not os.path.isdir(os.path.join(data_path, "val")):
        logger.warning(f"No val/ folder in {data_path}: online k-NN is off.")
        return None
    return build_eval_splits(data_path, image_size, subset)


def tolerant_collate(image_size: int) -> Callable[[list], Any]:
    """Collate for SafeImageFolder samples: an unreadable file becomes a black image with
    label -1 (so every rank keeps its exact shard size), logged as a warning; drop those
    rows afterwards with ``drop_unreadable``."""

    def collate(samples: list) -> Any:
        out = []
        for s in samples:
            if isinstance(s, str):  # data._BadSample: the path of a file that could not be read
                logger.warning(f"skipped unreadable image {s}")
                out.append((torch.zeros(3, image_size, image_size, dtype=torch.uint8), -1))
            else:
                out.append((torch.as_tensor(s[0]).as_subclass(torch.Tensor), s[1]))
        return default_collate(out)

    return collate


def drop_unreadable(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels >= 0
    if not bool(keep.all()):
        logger.warning(f"{int((~keep).sum())} unreadable images left out.")
    return feats[keep], labels[keep]


def resolve_eval_precision(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """Resolve ``args.precision`` (auto, bf16, fp16, fp32) for inference on ``device``: logs the
    choice in one line, stores the resolved name back in ``args`` and returns its autocast
    dtype (None: fp32). A precision the device cannot run is an EvalError."""
    try:
        choice = resolve_precision(args.precision, device, training=False)
    except PrecisionError as e:
        raise EvalError(str(e)) from None
    args.precision = choice.name
    log_precision(choice)
    return choice.dtype


def add_precision_arg(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="Autocast precision of the "
        "backbone's forward pass. auto: bf16 where the hardware computes it natively (CPUs with AMX "
        "or AVX512-BF16, GPUs from A100/RTX 30xx on), else fp32 on a CPU and fp16 on a GPU; "
        "SIMPOOL_NATIVE_BF16=0/1 overrides the hardware probe.",
    )


def evaluate_each_key(
    evaluate: Callable[[argparse.Namespace], Any],
    args: argparse.Namespace,
    folders: Sequence[str] = ("output_dir",),
    one_key_flags: Sequence[str] = (),
    summary: Callable[[Any], str] | None = None,
) -> Any:
    """``evaluate(args)`` once per key of a comma-separated ``--checkpoint_key`` (AttMask's and
    iBOT's ``teacher,student``), each run with its own copy of ``args`` whose ``folders`` flags
    (those given) point to a subfolder named after the key, so no run overwrites another's files.
    One key: ``evaluate(args)`` as it is. Several: ``{key: result}``, and one line per key from
    ``summary(result)`` at the end; a flag of ``one_key_flags`` given too is a one-line error.

    Example:
        >>> args = argparse.Namespace(checkpoint_key="teacher,student", output_dir="out")
        >>> results = evaluate_each_key(lambda run: run.output_dir, args, summary=str)
        --checkpoint_key teacher (1 of 2): results in out/teacher
        --checkpoint_key student (2 of 2): results in out/student
        teacher: out/teacher
        student: out/student
        >>> results
        {'teacher': 'out/teacher', 'student': 'out/student'}
    """
    keys = args.checkpoint_key.split(",")
    if len(keys) == 1:
        return evaluate(args)
    for flag in one_key_flags:
        if getattr(args, flag):
            raise EvalError(
                f"--{flag} belongs to one network; pass one --checkpoint_key with it, not {args.checkpoint_key!r}"
            )
    main_process = utils.launch_environment()[0] == 0  # readable before (and after) the runs join a group
    results = {}
    for i, key in enumerate(keys, 1):
        run = copy.copy(args)
        run.checkpoint_key = key
        for flag in folders:
            if getattr(run, flag):
                setattr(run, flag, os.path.join(getattr(run, flag), key))
        if main_process:
            print(f"--checkpoint_key {key} ({i} of {len(keys)}): results in {run.output_dir}", flush=True)
        results[key] = evaluate(run)
    if summary and main_process:
        for key, result in results.items():
            print(f"{key}: {summary(result)}", flush=True)
    return results


def run_main(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Run ``fn(args)``; user-facing errors print ``error: ...`` and exit with code 2
    (utils.USER_ERROR_EXIT), never a traceback."""
    return utils.run_command(fn, args)


def avgpool_mode(text: str | int) -> int:
    """argparse type of ``--avgpool_patchtokens``: DINO's False/True or iBOT's (AttMask's) 0/1/2.
    0 (False): the image vector alone; 1: the mean of the last block's patch tokens alone;
    2 (True): both, concatenated."""
    if str(text) in ("0", "1", "2"):
        return int(text)
    try:
        return 2 if utils.bool_flag(text) else 0
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected False (0), 1 or True (2), got {text!r}") from None


def add_feature_args(parser: argparse.ArgumentParser, n_last_blocks: int) -> argparse._ArgumentGroup:
    """``--n_last_blocks`` (default ``n_last_blocks``: DINO's 4 for the linear probe, 1 for
    k-NN) and ``--avgpool_patchtokens``, as DINO's and iBOT's evaluation scripts spell them."""
    g = parser.add_argument_group("features")
    g.add_argument(
        "--n_last_blocks",
        default=n_last_blocks,
        type=number(int, low=1),
        help="[CLS] models: "
        "concatenate the [CLS] token of this many last blocks (DINO's linear probe: 4 for ViT-S, 1 for "
        "ViT-B; k-NN: 1). SimPool models and convnets use their one pooled vector.",
    )
    g.add_argument(
        "--avgpool_patchtokens",
        default=0,
        type=avgpool_mode,
        help="The mean of the last block's patch "
        "tokens: False or 0 leaves it out, True or 2 appends their mean after the final norm to the image "
        "vector (DINO's True: its ViT-B linear probe), 1 uses their mean before the final norm alone "
        "(iBOT's and AttMask's 1, whose mean-pooling models have no final norm). ViTs only.",
    )
    return g


def add_window_size_arg(group: argparse._ActionsContainer) -> None:
    """AttMask's evaluation scripts take ``--window_size`` for their Swin backbones and pass it
    to nothing else; no backbone here has windows, so it is taken, as there for ViTs, and unused."""
    group.add_argument(
        "--window_size",
        default=7,
        type=number(int, low=1),
        help="AttMask's Swin attention window; "
        "no backbone here has windows, so it is accepted (AttMask's commands run as written) and "
        "unused, as AttMask's scripts leave it for ViTs.",
    )


class FrozenFeatures(nn.Module):
    """The feature vector the evaluations read from a frozen backbone.

    The image vector: SimPool's pooled vector (simpool mode), or the [CLS] tokens of the last
    ``n_last_blocks`` blocks after the final norm, concatenated (official mode). ``avgpool``
    (``avgpool_mode``'s 0/1/2; False/True mean 0/2) appends (2) the mean of the last block's
    patch tokens after the final norm, as DINO's True does, or replaces the image vector by (1)
    their mean before it: iBOT's and AttMask's scripts build the model for 1 with mean pooling,
    whose final norm is an identity, and average the tokens it returns. Convnets (no blocks,
    no patch tokens): the pooled vector in either mode; ``n_last_blocks`` and ``avgpool`` are
    ignored.

    Example:
        >>> from simpool import vision_transformer
        >>> vit = vision_transformer.build_vit("vit_nano", patch_size=7, img_size=28, mode="official")
        >>> f = FrozenFeatures(vit, n_last_blocks=4, avgpool=2)
        >>> f(torch.randn(2, 3, 28, 28)).shape, f.dim
        (torch.Size([2, 960]), 960)
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, avgpool: int | bool = 0) -> None:
        super().__init__()
        vit = hasattr(backbone, "blocks") and hasattr(backbone, "prepare_tokens")  # convnets have neither
        self.backbone = backbone
        self.avgpool = (2 if avgpool is True else int(avgpool)) if vit else 0
        if self.avgpool not in (0, 1, 2):
            raise ValueError(f"avgpool must be 0, 1 or 2, got {avgpool!r}")
        self.cls_blocks = vit and backbone.mode == "official"
        self.n_last_blocks = min(n_last_blocks, len(backbone.blocks)) if self.cls_blocks else 1
        image_vector = 0 if self.avgpool == 1 else self.n_last_blocks
        self.dim = backbone.embed_dim * (image_vector + int(self.avgpool > 0))

    def settings(self) -> dict[str, int]:
        """What the features were made of, as the evaluations record it."""
        return {"n_last_blocks": self.n_last_blocks, "avgpool_patchtokens": self.avgpool}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if not self.cls_blocks:
            if not self.avgpool:
                return bb(x)
            out = bb.forward_features(x)
            if self.avgpool == 1:
                return out["raw_patch_tokens"].mean(dim=1)
            return torch.cat([out["pooled"], out["patch_tokens"].mean(dim=1)], dim=-1)
        x = bb.prepare_tokens(x)
        outputs = []
        first = len(bb.blocks) - self.n_last_blocks
        for i, blk in enumerate(bb.blocks):
            x = blk(x)
            if i >= first:
                outputs.append(bb.norm(x))
        if self.avgpool == 1:
            return x[:, bb.num_prefix_tokens :].mean(dim=1)
        mean = [outputs[-1][:, bb.num_prefix_tokens :].mean(dim=1)] if self.avgpool else []
        return torch.cat([o[:, 0] for o in outputs] + mean, dim=-1)


def log_feature_choice(features: FrozenFeatures, info: dict[str, Any], args: argparse.Namespace) -> None:
    """A log line for each feature flag that does not apply as given (a convnet, a SimPool
    model, more blocks than the backbone has), and one saying what iBOT's ``1`` means."""
    if is_convnet(info["arch"]):
        if args.n_last_blocks != 1 or args.avgpool_patchtokens:
            logger.info(
                f"{info['arch']} is a convnet: features are its pooled vector ({info['mode']} pooling); "
                "--n_last_blocks and --avgpool_patchtokens apply to ViTs only and are ignored."
            )
        return
    if args.avgpool_patchtokens == 1:
        logger.info(
            "--avgpool_patchtokens 1: the mean of the last block's patch tokens alone, before the final "
            "norm (iBOT's 1; DINO's True, the image vector and the normalised mean, is True or 2)."
        )
    if info["mode"] != "official" and args.n_last_blocks != 1:
        logger.info("SimPool backbone: features are its pooled vector (--n_last_blocks applies to [CLS] models).")
    elif features.cls_blocks and features.n_last_blocks < args.n_last_blocks:
        logger.info(
            f"--n_last_blocks {args.n_last_blocks}: the backbone has {features.n_last_blocks} blocks; "
            "using all of them."
        )


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data flags shared by eval_knn and eval_linear; returns their argument group."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data_path",
        default="fashion-mnist",
        type=str,
        help="ImageFolder root holding train/ and "
        "val/ (<class>/<image> each), or 'fashion-mnist' (its train and test splits).",
    )
    g.add_argument(
        "--image_size",
        default=None,
        type=number(int, low=1),
        help="Side of the images the backbone sees; "
        "default: the checkpoint's training size (global_crops_size), else 224. A ViT's positions are "
        "interpolated from its trained grid; convnets see at least 32 px (a smaller size is raised to "
        "32, logged).",
    )
    g.add_argument(
        "--subset",
        default=-1,
        type=subset_size,
        help="Keep this many training images per class "
        "(-1: all): the first ones of each class in folder order (sorted file names), as AttMask picks "
        "them, so --subset 260 is its 20%% ImageNet split.",
    )
    g.add_argument(
        "--subset_starts",
        default=0,
        type=number(int, low=0),
        help="With --subset N: keep the training "
        "images from this position of each class on (AttMask's low-shot runs: --subset 5 with 0, 5, 10, "
        "15, 20 for five disjoint sets).",
    )
    g.add_argument(
        "--val_subset",
        default=-1,
        type=subset_size,
        help="Keep this many evaluation images per class (-1: all), the first ones of each class.",
    )
    return g


def weights_fingerprint(model):
    """Three float64 sums over a model's weights (of the values, of their squares, and of the
    values weighted by their tensor's position): equal for the same weights wherever the file
    lies, different for any other checkpoint, key or random initialisation."""
    total = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            t = t.detach().double().cpu()
            total += torch.stack([t.sum(), t.square().sum(), (i + 1) * t.sum()])
    return total.tolist()


def load_saved_head(args, features, info):
    """The head --evaluate scores, and its path; a one-line error when it was trained on other
    features than this run's backbone, checkpoint key, image size and feature flags give."""
    path = args.pretrained_linear or os.path.join(args.output_dir, "linear_head.pth")
    head = utils.load_checkpoint(path)
    if not isinstance(head, dict) or not torch.is_tensor(head.get("weight")) or not torch.is_tensor(head.get("bias")):
        raise EvalError(f"{path} is not a linear head saved by eval_linear.py")
    if head["weight"].shape[1] != features.dim:
        raise EvalError(
            f"{path} takes features of dimension {head['weight'].shape[1]} but this backbone gives "
            f"{features.dim} (check --n_last_blocks / --avgpool_patchtokens / --pretrained_weights)"
        )
    # the same width can come from other features (2 blocks' [CLS], or 1 block's with the patch average)
    trained_on = {k: (head.get("features") or {}).get(k) for k in ("n_last_blocks", "avgpool_patchtokens")}
    if isinstance(trained_on["avgpool_patchtokens"], bool):  # heads saved before 0/1/2: DINO's False/True
        trained_on["avgpool_patchtokens"] = 2 if trained_on["avgpool_patchtokens"] else 0
    if None not in trained_on.values() and trained_on != features.settings():
        raise EvalError(
            f"{path} was trained on the features of --n_last_blocks {trained_on['n_last_blocks']} "
            f"--avgpool_patchtokens {trained_on['avgpool_patchtokens']}; pass the same flags"
        )
    model = {k: (head.get("model") or {}).get(k) for k in ("arch", "patch_size", "mode")}
    if None not in model.values() and model != {k: info.get(k) for k in model}:
        raise EvalError(
            f"{path} was trained on a {model['arch']}/{model['patch_size']} ({model['mode']}) backbone "
            f"but --pretrained_weights gives a {info['arch']}/{info['patch_size']} ({info['mode']}) one"
        )
    # the same backbone shape with other weights, another key or another resolution: other features
    trained_size = (head.get("model") or {}).get("image_size")
    if trained_size is not None and trained_size != info["image_size"]:
        raise EvalError(
            f"{path} was trained on {trained_size}px features but this run computes them at "
            f"{info['image_size']}px; pass --image_size {trained_size}"
        )
    fingerprint = head.get("weights_fingerprint")
    if fingerprint is not None and not all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(fingerprint, info["weights_fingerprint"])
    ):
        trained = f"{head.get('pretrained_weights') or 'a random initialisation'} [{head.get('checkpoint_key')}]"
        given = f"{args.pretrained_weights or 'a random initialisation'} [{args.checkpoint_key}]"
        raise EvalError(
            f"{path} was trained on the weights of {trained}, not those of {given}; pass the same "
            "--pretrained_weights and --checkpoint_key"
        )
    return head, path
