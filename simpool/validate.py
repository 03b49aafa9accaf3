"""Top-1 / top-5 of a checkpoint's own classifier on an ImageFolder split, as the FCViT and
SimPool READMEs validate their ImageNet models.

    python -m simpool.validate --arch fcvit_tiny --checkpoint fcvit_tiny.pth --data_path /imagenet
    python -m simpool.validate --checkpoint output/linear/linear_head.pth --data_path /imagenet

Classifiers read (from the top level of the file, or its ``state_dict``, ``model`` or
``state_dict_ema`` entry; ``module.`` prefixes dropped):

- released FCViT (``patch_embed.*``, ``network.*``, ``norm.*`` and the classifier ``head.*``);
- timm-style ResNet-50 (``conv1.*``, ``layer*.*``, classifier ``fc.*``), ConvNeXt (``stem.*``,
  ``stages.*``, ``head.norm.*``, classifier ``head.fc.*``) and [CLS] ViT (DINO/timm names,
  classifier ``head.*``); with ``simpool.*`` weights beside the trunk, SimPool pools it;
- a linear head saved by eval_linear.py (``linear_head.pth``: weight, bias, classes), on the
  features of the backbone it records (its checkpoint, key, architecture, pooling, feature flags
  and image size; the backbone's weights must still be the ones it was trained on).

The classifier reads exactly the vector the backbone wrapper gives in the checkpoint's mode
(``simpool.build_backbone``): e.g. FCViT's mean of its normed last map, ResNet's global average,
ConvNeXt's average through its head LayerNorm, the ViT's normed [CLS] token.

Data: ``DATA/val`` when it exists, else ``DATA`` itself (class folders), or 'fashion-mnist'
(its test split). Transform: DINO's and timm's evaluation transform, the short side resized to
``image_size`` x 256/224 (bicubic), a centre crop of ``image_size`` (224; a linear head: the size
of its features), ImageNet mean/std.

Classes: the classifier's outputs are the classes. A linear head records its class names, and
each class folder is scored as the head's class of the same name. Other classifiers record none:
class folder i (in sorted folder order, as ImageFolder and ImageNet training number them) is
output i; fewer folders than outputs are scored as the first outputs (logged), more are an error.

The result (top-1, top-5, counts, settings) is printed and written to ``OUTPUT_DIR/validate.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, default_collate

from simpool import backbones, utils
from simpool.checkpoints import (
    AUTO,
    RELEASED_FCVIT_KEY,
    CheckpointError,
    backbone_from_state,
    gamma_arg,
    load_pretrained,
    read_checkpoint,
    released_layouts,
)
from simpool.data import FASHION_MNIST, DataError, build_dataset, eval_transform, normalize_batch
from simpool.evaluation import (
    EvalError,
    FrozenFeatures,
    add_precision_arg,
    is_in_memory,
    load_saved_head,
    resolve_eval_precision,
    tolerant_collate,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from simpool.data import InMemoryImages, SafeImageFolder

logger = logging.getLogger("simpool")
__all__ = ["load_classifier", "split_classifier", "class_index_map", "validate", "main"]

ENTRIES = ("state_dict", "model", "state_dict_ema")  # where timm's and the authors' scripts keep the weights
# family: (a key only its classifier checkpoints hold, the classifier's prefix); the first match wins
FAMILIES = {
    "fcvit": (RELEASED_FCVIT_KEY, "head."),
    "resnet": ("layer4.0.conv1.weight", "fc."),
    "convnext": ("stages.0.blocks.0.conv_dw.weight", "head.fc."),
    "vit": ("patch_embed.proj.weight", "head."),
}
LINEAR_HEAD_KEYS = {"weight", "bias", "classes"}  # eval_linear.py's linear_head.pth


class Classifier(nn.Module):
    """A backbone's vector (or an eval_linear feature vector) through a linear classifier."""

    def __init__(self, features: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight.float())
            self.head.bias.copy_(bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pick_entry(ckpt: dict[str, Any], key: str | None, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, entry name) of the classifier weights in ``ckpt``."""
    if key:
        if not isinstance(ckpt.get(key), dict):
            raise EvalError(f"{path} has no '{key}' entry (it holds: {', '.join(sorted(map(str, ckpt))[:12])})")
        state, what = ckpt[key], key
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state, what = ckpt, "top level"
    else:
        what = next((k for k in ENTRIES if isinstance(ckpt.get(k), dict)), None)
        if what is None:
            holds = ", ".join(sorted(map(str, ckpt))[:12])
            hint = (
                " (a pretraining checkpoint: train a linear probe with eval_linear.py and validate its linear_head.pth)"
                if "teacher" in ckpt
                else ""
            )
            raise EvalError(
                f"{path} holds no classifier weights at the top level or in {', '.join(ENTRIES)} "
                f"(it holds: {holds}){hint}"
            )
        state = ckpt[what]
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise EvalError(f"{path} [{what}] is not a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}, what


def split_classifier(
    state: dict, path: str = "checkpoint"
) -> tuple[str, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(family, backbone state under the wrapper's names, classifier weight, classifier bias)
    of a classifier checkpoint's ``state``; a one-line EvalError when it holds none."""
    family = next((f for f, (key, _) in FAMILIES.items() if key in state), None)
    if family is None:
        raise EvalError(
            f"{path} holds no classifier of a released FCViT, ResNet-50, ConvNeXt or ViT "
            f"(its keys start {', '.join(list(state)[:3])})"
        )
    prefix = FAMILIES[family][1]
    head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if set(head) != {"weight", "bias"} or head["weight"].ndim != 2:
        raise EvalError(
            f"{path} has a {family} trunk but no linear classifier {prefix}weight/{prefix}bias "
            f"(found: {', '.join(prefix + k for k in head) or 'none'})"
        )
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if family == "vit" and any(k.startswith("fc_norm.") for k in rest):
        raise EvalError(
            f"{path} is a ViT classifier on averaged patch tokens (fc_norm.*); only [CLS] ViT classifiers are read"
        )
    if family == "convnext":  # timm's names, head.norm included, are the trunk's
        rest = {(k if k.startswith("simpool.") else f"trunk.{k}"): v for k, v in rest.items()}
    else:
        rest = released_layouts(rest, path)
    return family, rest, head["weight"], head["bias"]


def load_classifier(
    path: str,
    arch: str | None = None,
    checkpoint_key: str | None = None,
    gamma: str | float | None = AUTO,
    pretrained_weights: str | None = None,
    image_size: int | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """(classifier module, info) of the checkpoint in ``path``: a classifier checkpoint or an
    eval_linear.py linear head (see the module docstring). ``info``: arch, mode, family,
    num_outputs, class_names (or None), image_size, source."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    if LINEAR_HEAD_KEYS <= ckpt.keys() and torch.is_tensor(ckpt["weight"]):
        return _linear_probe(ckpt, path, arch, pretrained_weights, image_size)
    state, what = _pick_entry(ckpt, checkpoint_key, path)
    family, trunk, weight, bias = split_classifier(state, path)
    source = f"{path} [{what}]"
    backbone, built = backbone_from_state(trunk, source, arch, gamma)
    if backbone.embed_dim != weight.shape[1]:
        raise EvalError(
            f"{source}: the classifier takes {weight.shape[1]}-d vectors but the {built['arch']} "
            f"backbone gives {backbone.embed_dim}-d ones"
        )
    image_size = image_size or 224
    smallest = backbones.smallest_input(built["arch"], built["patch_size"])
    if image_size < smallest:
        raise EvalError(f"--image_size {image_size} is below the smallest input of {built['arch']} ({smallest} px)")
    info = dict(
        built, family=family, num_outputs=weight.shape[0], class_names=None, image_size=image_size, source=source
    )
    return Classifier(backbone, weight, bias).eval(), info


def _linear_probe(
    head: dict[str, Any], path: str, arch: str | None, pretrained_weights: str | None, image_size: int | None
) -> tuple[Classifier, dict[str, Any]]:
    """An eval_linear.py head on the features of the backbone it was trained on, checked by
    eval_linear's own rules (architecture, feature flags, image size, weights fingerprint)."""
    weights = pretrained_weights or head.get("pretrained_weights")
    if not weights:
        raise EvalError(
            f"{path} was trained on the features of a random initialisation, which cannot be rebuilt to validate it"
        )
    model = head.get("model") or {}
    key = head.get("checkpoint_key") or "teacher"
    backbone, info = load_pretrained(
        weights,
        key,
        arch or model.get("arch"),
        model.get("patch_size"),
        model.get("mode"),
        model.get("gamma", AUTO),
        image_size=image_size or model.get("image_size"),
    )
    info["weights_fingerprint"] = weights_fingerprint(backbone)
    settings = head.get("features") or {}
    features = FrozenFeatures(backbone, settings.get("n_last_blocks") or 1, settings.get("avgpool_patchtokens") or 0)
    checks = argparse.Namespace(pretrained_linear=path, output_dir="", pretrained_weights=weights, checkpoint_key=key)
    load_saved_head(checks, features, info)
    info = dict(
        arch=info["arch"],
        patch_size=info["patch_size"],
        mode=info["mode"],
        gamma=info["gamma"],
        family="linear probe",
        num_outputs=head["weight"].shape[0],
        class_names=list(head["classes"]),
        image_size=info["image_size"],
        source=f"{path} on {info['source']}",
    )
    return Classifier(features, head["weight"], head["bias"]).eval(), info


def class_index_map(
    folder_classes: list, num_outputs: int, class_names: list | None = None
) -> tuple[torch.Tensor, str]:
    """(LongTensor: folder class index -> classifier output, rule): by name where the classifier
    records its class names, else folder index i -> output i (see the module docstring)."""
    if class_names is not None:
        unknown = [c for c in folder_classes if c not in class_names]
        if unknown:
            raise EvalError(
                f"class folders the linear head was not trained on: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''} (its classes: {', '.join(class_names[:5])} ...)"
            )
        return torch.tensor([class_names.index(c) for c in folder_classes]), "by name"
    if len(folder_classes) > num_outputs:
        raise EvalError(f"{len(folder_classes)} class folders but the classifier has {num_outputs} outputs")
    if len(folder_classes) < num_outputs:
        logger.info(
            f"{len(folder_classes)} class folders for {num_outputs} outputs: folder i (sorted order) is "
            f"scored as output i, so they must be the classifier's first {len(folder_classes)} classes."
        )
    return torch.arange(len(folder_classes)), "by index"


def _val_split(data_path: str, image_size: int) -> InMemoryImages | SafeImageFolder:
    """The evaluation split: Fashion-MNIST's test set, ``DATA/val``, or ``DATA`` itself."""
    if data_path == FASHION_MNIST:
        return build_dataset(data_path, "test")
    return build_dataset(data_path, "val", transform=eval_transform(image_size), split_folder_ok=True)


def validate(
    model: nn.Module,
    dataset: InMemoryImages | SafeImageFolder,
    index_map: torch.Tensor,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict:
    """Top-1 / top-5 (%) of ``model``'s logits on ``dataset``, labels mapped by ``index_map``;
    unreadable images are left out and counted."""
    collate = (
        (lambda batch: batch if isinstance(batch, tuple) else default_collate(batch))
        if is_in_memory(dataset)
        else tolerant_collate(image_size)
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    device = torch.device(device)
    model = model.to(device).eval()
    index_map = index_map.to(device)
    metrics = utils.MetricLogger()
    hits1 = hits5 = seen = 0
    for images, labels in metrics.log_every(loader, max(1, len(loader) // 10), "Validate"):
        labels = torch.as_tensor(labels).to(device)
        x = normalize_batch(images.to(device), dataset.mean, dataset.std, image_size)
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None),
        ):
            logits = model(x).float()
        keep = labels >= 0
        target = index_map[labels[keep]]
        top = logits[keep].topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == target[:, None]
        hits1, hits5, seen = hits1 + int(hit[:, 0].sum()), hits5 + int(hit.any(1).sum()), seen + int(keep.sum())
        metrics.update(acc1=100.0 * hits1 / max(seen, 1), acc5=100.0 * hits5 / max(seen, 1))
    if not seen:
        raise DataError("no image of the evaluation split could be read")
    return {
        "top1": 100.0 * hits1 / seen,
        "top5": 100.0 * hits5 / seen,
        "n_images": seen,
        "unreadable": len(dataset) - seen,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simpool.validate",
        description="Top-1/top-5 of a checkpoint's own "
        "classifier on an ImageFolder split (resize 256, centre crop 224, ImageNet mean/std)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=str,
        help="A classifier checkpoint (released FCViT, timm-style "
        "ResNet-50/ConvNeXt/ViT) or a linear_head.pth of eval_linear.py.",
    )
    p.add_argument(
        "--arch",
        default=None,
        type=backbones.arch_arg,
        choices=list(backbones.ARCHS),
        help="Backbone architecture; default: from the weights (a linear head: the one it records).",
    )
    p.add_argument(
        "--checkpoint_key",
        default=None,
        type=str,
        help="Entry of the file that holds the weights (e.g. "
        "state_dict_ema); default: the top level, else state_dict, model or state_dict_ema. A linear head "
        "reads its backbone from the entry it records.",
    )
    p.add_argument(
        "--gamma",
        default=AUTO,
        type=gamma_arg,
        help="SimPool's exponent, for classifiers whose trunk "
        "is pooled by SimPool: 'auto' (2.0 for convnets, None for ViTs), 'None' or a number.",
    )
    p.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Linear heads only: the backbone checkpoint, where it lies now (default: the path the head records).",
    )
    p.add_argument(
        "--data_path",
        required=True,
        type=str,
        help="ImageFolder root: its val/ folder when it has one, "
        "else the class folders in it; or 'fashion-mnist' (its test split).",
    )
    p.add_argument(
        "--image_size",
        default=None,
        type=utils.number(int, low=1),
        help="Centre-crop side; the short "
        "side is resized to image_size x 256/224 first. Default: 224 (a linear head: its features' size; "
        "another size is refused, as eval_linear.py --evaluate does). Convnets need 32 or more.",
    )
    p.add_argument("--batch_size", default=128, type=utils.number(int, low=1), help="Images per forward pass.")
    p.add_argument(
        "--num_workers", default=4, type=utils.number(int, low=0), help="Data-loading processes (ImageFolder only)."
    )
    p.add_argument("--output_dir", default=".", type=str, help="Where validate.json is written.")
    add_precision_arg(p)
    p.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    return p


def run(args: argparse.Namespace) -> dict:
    utils.ensure_writable_dir(args.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, info = load_classifier(
        args.checkpoint, args.arch, args.checkpoint_key, args.gamma, args.pretrained_weights, args.image_size
    )
    image_size = info["image_size"]
    dataset = _val_split(args.data_path, image_size)
    index_map, rule = class_index_map(list(dataset.classes), info["num_outputs"], info["class_names"])
    amp_dtype = resolve_eval_precision(args, device)
    logger.info(
        f"Validating the {info['family']} classifier of {info['source']} ({info['arch']}, {info['mode']}, "
        f"{info['num_outputs']} outputs) on {len(dataset)} images of {args.data_path} "
        f"({len(dataset.classes)} classes, mapped {rule}) at {image_size}px."
    )
    result = validate(model, dataset, index_map, image_size, args.batch_size, device, amp_dtype, args.num_workers)
    print(
        f"{info['arch']} classifier on {result['n_images']} images: top-1 {result['top1']:.2f}%  "
        f"top-5 {result['top5']:.2f}%"
    )
    record = {
        **result,
        "checkpoint": args.checkpoint,
        "source": info["source"],
        "family": info["family"],
        "model": {k: info.get(k) for k in ("arch", "patch_size", "mode", "gamma")},
        "num_outputs": info["num_outputs"],
        "classes": len(dataset.classes),
        "class_map": rule,
        "data_path": args.data_path,
        "image_size": image_size,
        "resize": round(image_size * 256 / 224),
        "precision": args.precision,
    }
    path = os.path.join(args.output_dir, "validate.json")
    utils.write_json(path, record)
    logger.info(f"Wrote {path}.")
    return record


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = get_args_parser().parse_args(argv)
    utils.setup_logging()
    return utils.run_command(run, args)


if __name__ == "__main__":
    main()
