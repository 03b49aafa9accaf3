"""Attention maps of a backbone: image overlays, and how well they find the object.

    python -m simpool.attention --pretrained_weights output/checkpoint.pth --images a.jpg b.png --output_dir maps
    python -m simpool.attention --pretrained_weights output/checkpoint.pth --evaluate --output_dir maps
    python -m simpool.attention --pretrained_weights ckpt.pth --evaluate --mask_dir pairs/ --output_dir maps

The map is SimPool's attention over patches (simpool mode) or the last block's [CLS]
attention (official mode: per head, and their mean, which is the map the [CLS] pools with).
Convnets (resnet50, convnext_*, fcvit_*) in simpool mode give SimPool's map over their last
feature map (one cell per 32x32 pixels), upsampled to the image like the ViT maps
(``image_attention``); in official mode they pool by global average and have no map.

``--evaluate`` scores the map against object masks (DINO's protocol): keep the most
attended tokens until they hold 60% of the attention mass, upsample that token mask to
pixels, and report its Jaccard index with the object mask, and a CorLoc-style hit rate
(the box of the largest connected part of the kept mask has IoU >= 0.5 with the object's
box). The built-in set pastes Fashion-MNIST test items (exact masks: the item's pixels
> 0) at random positions and scales onto real textures bundled with scikit-image, with a
fixed seed; ``--mask_dir`` takes your own pairs instead. The same command runs on SimPool
and [CLS] models, so their maps compare directly.

Example:
    >>> attn = torch.tensor([[0.5, 0.3], [0.15, 0.05]])      # a 2x2 token grid
    >>> mass_mask(attn.flatten(), 0.6).view(2, 2)            # top 60% of the mass
    tensor([[ True,  True],
            [False, False]])
    >>> gt = torch.zeros(4, 4, dtype=torch.bool); gt[:, :2] = True   # patch 2, 4x4 image
    >>> round(jaccard(token_mask_to_pixels(mass_mask(attn.flatten(), 0.6).view(2, 2), 2, (4, 4)), gt), 4)
    0.3333
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from simpool import utils
from simpool import vision_transformer as vits
from simpool.augment import IMAGENET_MEAN, IMAGENET_STD, eight_bit
from simpool.backbones import ConvNetBackbone, upsample_attention
from simpool.checkpoints import add_model_args, is_convnet, load_pretrained
from simpool.data import FASHION_MNIST, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from simpool.evaluation import add_precision_arg, resolve_eval_precision
from simpool.precision import autocast
from simpool.utils import number

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger("simpool")
__all__ = [
    "attention_maps",
    "image_attention",
    "map_cell_size",
    "cls_attention_heads",
    "mass_mask",
    "token_mask_to_pixels",
    "jaccard",
    "largest_component",
    "mask_box",
    "box_iou",
    "score_map",
    "colormap",
    "overlay",
    "synthetic_set",
    "folder_set",
    "evaluate_maps",
]
TEXTURES = ("grass", "gravel", "brick", "moon")
CONVNET_STRIDE = 32  # pixels per cell of a convnet's last feature map (ResNet-50, ConvNeXt, FCViT)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class AttentionError(utils.UserError, ValueError):
    """A user-facing problem with the inputs; its message is one line."""


# ---------------------------------------------------------------- maps
@torch.no_grad()
def cls_attention_heads(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS] attention over the patch tokens, per head: (B, heads, N).
    Its mean over heads is ``vision_transformer.cls_attention(..., average_heads=True)``."""
    tokens = model.prepare_tokens(x)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    return vits.cls_attention(model.blocks[-1], tokens, model.num_prefix_tokens, average_heads=False)


def map_cell_size(model: torch.nn.Module) -> int:
    """Pixels per map cell: a ViT's patch size, a convnet's stride (32)."""
    return CONVNET_STRIDE if isinstance(model, ConvNetBackbone) else model.patch_size


@torch.no_grad()
def attention_maps(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, gh, gw) attention over the patch grid: SimPool's map (one head unless
    SimPool has several) or the [CLS] attention of each head of the last block. For a
    convnet, SimPool's map over its last feature map (``grid_size``); a convnet in
    official mode (global average pooling) has none: ``AttentionError``."""
    if isinstance(model, ConvNetBackbone) and model.simpool is None:
        raise AttentionError(
            f"{getattr(model, 'arch', 'this convnet')} in official mode pools by global average "
            "and has no attention map; maps need a --mode simpool backbone"
        )
    gh, gw = model.grid_size(*x.shape[-2:])
    x = x.to(next(model.parameters()).device)
    if model.mode == "official":
        attn = cls_attention_heads(model, x)
    else:
        attn = model.forward_features(x, return_attention=True)["attention"]
        if attn.dim() == 2:
            attn = attn[:, None]
    return attn.float().reshape(x.shape[0], -1, gh, gw).cpu()


@torch.no_grad()
def image_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W): ``attention_maps`` upsampled (bilinear) to the input's H x W, for
    any backbone (``simpool.backbones.upsample_attention`` over ``grid_size``)."""
    maps = attention_maps(model, x)
    B, heads, gh, gw = maps.shape
    up = upsample_attention(maps.reshape(B * heads, gh * gw), (gh, gw), tuple(x.shape[-2:]))
    return up.reshape(B, heads, *x.shape[-2:])


# ---------------------------------------------------------------- metrics
def mass_mask(attn: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Boolean mask of the most attended entries that together hold ``threshold`` of the
    mass along the last dim (DINO: a token is kept while the mass of the tokens ranked
    above it is below the threshold)."""
    attn = attn.float()
    values, order = attn.sort(dim=-1, descending=True)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    before = values.cumsum(dim=-1) - values  # mass strictly above each ranked token
    keep_sorted = before < threshold
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def token_mask_to_pixels(mask: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) token mask -> (H, W) pixel mask: each token covers patch_size^2 pixels;
    pixels beyond the grid (image sides not multiples of the patch) are False."""
    up = mask.bool().repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    out = torch.zeros(size, dtype=torch.bool)
    h, w = min(size[0], up.shape[0]), min(size[1], up.shape[1])
    out[:h, :w] = up[:h, :w]
    return out


def jaccard(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 4-connected component of a small boolean (h, w) mask."""
    m = mask.bool().cpu().numpy()
    labels = np.zeros(m.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(m)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < m.shape[0] and 0 <= nx < m.shape[1] and m[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return torch.from_numpy(labels == best) if best else torch.zeros(mask.shape, dtype=torch.bool)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) with exclusive ends of a boolean mask's True pixels, or None."""
    ys, xs = torch.nonzero(mask.bool(), as_tuple=True)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / max(area(a) + area(b) - inter, 1e-12)


def score_map(attn_grid: torch.Tensor, target: torch.Tensor, patch_size: int, threshold: float = 0.6) -> dict[str, Any]:
    """Jaccard and CorLoc hit of one (gh, gw) attention map against an (H, W) object mask."""
    keep = mass_mask(attn_grid.flatten(), threshold).view(attn_grid.shape)
    pixels = token_mask_to_pixels(keep, patch_size, tuple(target.shape))
    box = token_mask_to_pixels(largest_component(keep), patch_size, tuple(target.shape))
    return {"jaccard": jaccard(pixels, target), "hit": box_iou(mask_box(box), mask_box(target)) >= 0.5, "kept": pixels}


# ---------------------------------------------------------------- drawing
_CMAP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)  # inferno-like anchors


def colormap(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float array in [0, 1] (H, W) -> uint8 RGB (H, W, 3) on a dark-to-yellow scale."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_CMAP) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _CMAP[lo] + t * _CMAP[lo + 1]).round().astype(np.uint8)


def overlay(image: np.ndarray, amap: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """Blend the (gh, gw) map, bilinearly upsampled and min-max scaled, over a uint8
    (H, W, 3) image."""
    H, W = image.shape[:2]
    up = upsample_attention(amap.reshape(1, -1), tuple(amap.shape), (H, W))[0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
    colour = colormap(up.numpy()).astype(np.float32)
    return (alpha * colour + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def save_panel(tiles: Sequence[np.ndarray], path: str, display_size: int = 224) -> None:
    """Save tiles (uint8 (H, W, 3), same height) side by side with a 2-pixel gap; small
    images are enlarged (nearest) so the panel is at least ``display_size`` high."""
    H = tiles[0].shape[0]
    gap = np.full((H, 2, 3), 255, np.uint8)
    panel = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    img = Image.fromarray(panel)
    scale = max(1, math.ceil(display_size / H))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    try:
        img.save(path)
    except OSError as e:
        raise utils.RunError(f"could not write {path} ({e.strerror or e})") from None


def _mask_rgb(mask: torch.Tensor) -> np.ndarray:
    return np.repeat((mask.numpy()[..., None] * 255).astype(np.uint8), 3, axis=2)


# ---------------------------------------------------------------- data
def _resize_gray(a: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(a, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]


def synthetic_set(
    n: int, image_size: int, seed: int = 0, object_scale: Sequence[float] = (0.5, 0.9), background_gain: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST test items pasted onto real textures: uint8 images (n, 3, S, S)
    and their exact boolean masks (n, S, S). Each item is resized to a random fraction
    ``object_scale`` of the side S and placed at random; the mask is exactly the pixels
    pasted (resized item > 0.02). Textures (scikit-image's grass, gravel, brick, moon)
    are random crops at random scales, dimmed by ``background_gain``."""
    try:
        import skimage.data
    except ImportError:
        raise AttentionError(
            "the built-in set needs scikit-image (pip install scikit-image), or use --mask_dir"
        ) from None
    items, _ = load_fashion_mnist("test")
    textures = [getattr(skimage.data, name)().astype(np.float32) / 255 for name in TEXTURES]
    rng = np.random.default_rng(seed)
    S = image_size
    images = torch.zeros(n, S, S)
    masks = torch.zeros(n, S, S, dtype=torch.bool)
    for i in range(n):
        tex = textures[rng.integers(len(textures))]
        side = int(rng.integers(S, max(S, min(min(tex.shape), 6 * S)) + 1))
        y0, x0 = (int(rng.integers(0, d - side + 1)) for d in tex.shape)
        bg = _resize_gray(tex[y0 : y0 + side, x0 : x0 + side], (S, S)) * background_gain
        s = max(4, int(round(S * rng.uniform(*object_scale))))
        item = _resize_gray(items[int(rng.integers(len(items)))][0].numpy() / 255.0, (s, s)).clamp(0, 1)
        m = item > 0.02
        oy, ox = int(rng.integers(0, S - s + 1)), int(rng.integers(0, S - s + 1))
        region = bg[oy : oy + s, ox : ox + s]
        bg[oy : oy + s, ox : ox + s] = torch.where(m, item, region)
        masks[i, oy : oy + s, ox : ox + s] = m
        images[i] = bg
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    return images, masks


def resize_for_model(
    image: Image.Image, image_size: int, patch_size: int, resample: int = Image.BICUBIC
) -> Image.Image:
    """PIL image resized so its short side is about ``image_size`` and both sides are
    multiples of ``patch_size``."""
    w, h = image.size
    scale = image_size / min(w, h)
    size = (
        max(patch_size, round(w * scale / patch_size) * patch_size),
        max(patch_size, round(h * scale / patch_size) * patch_size),
    )
    return image.resize(size, resample)


def _open_image(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return eight_bit(im).convert(mode)
    except FileNotFoundError:
        raise AttentionError(f"{path}: no such file") from None
    except Exception as e:  # PIL raises many kinds for non-images and truncated files
        raise AttentionError(f"{path}: cannot read image ({type(e).__name__}: {str(e)[:120]})") from None


def folder_set(mask_dir: str, image_size: int, patch_size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Image + mask pairs from ``mask_dir``: ``images/<name>.<ext>`` with ``masks/<name>.png``
    (non-zero = object), or ``<name>.<ext>`` beside ``<name>_mask.png``. Returns a list of
    (name, uint8 image (3, h, w), bool mask (h, w)) at the model's resolution."""
    if not os.path.isdir(mask_dir):
        raise AttentionError(f"--mask_dir {mask_dir} is not a folder")
    pairs = []
    img_dir, msk_dir = os.path.join(mask_dir, "images"), os.path.join(mask_dir, "masks")
    if os.path.isdir(img_dir) and os.path.isdir(msk_dir):
        masks = {os.path.splitext(f)[0]: os.path.join(msk_dir, f) for f in os.listdir(msk_dir)}
        for f in sorted(os.listdir(img_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS and stem in masks:
                pairs.append((stem, os.path.join(img_dir, f), masks[stem]))
    else:
        files = sorted(os.listdir(mask_dir))
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS and not stem.endswith("_mask"):
                mask = next(
                    (os.path.join(mask_dir, m) for m in files if os.path.splitext(m)[0] == stem + "_mask"), None
                )
                if mask:
                    pairs.append((stem, os.path.join(mask_dir, f), mask))
    if not pairs:
        raise AttentionError(
            f"--mask_dir {mask_dir} holds no image/mask pairs (expected images/<name>.jpg with "
            "masks/<name>.png, or <name>.jpg beside <name>_mask.png)"
        )
    out = []
    for name, image_path, mask_path in pairs:
        original = _open_image(image_path, "RGB")
        mask = _open_image(mask_path, "L")
        # a mask of another size, or with no object, would be scored anyway and skew the averages
        if mask.size != original.size:
            raise AttentionError(
                f"{mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                f"{original.size[0]}x{original.size[1]}; a mask must match its image"
            )
        if mask.getextrema()[1] == 0:
            raise AttentionError(f"{mask_path} marks no object pixel (all zero); fix or remove the pair")
        image = resize_for_model(original, image_size, patch_size)
        mask = mask.resize(image.size, Image.NEAREST)
        out.append(
            (name, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), torch.from_numpy(np.asarray(mask) > 0))
        )
    return out


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = images.float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def norm_stats(choice: str, info: dict[str, Any]) -> tuple[Sequence[float], Sequence[float]]:
    if choice == "auto":
        choice = FASHION_MNIST if info.get("data_path") == FASHION_MNIST else "imagenet"
    return (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if choice == FASHION_MNIST else (IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------- evaluation
def center_prior(gh: int, gw: int) -> torch.Tensor:
    """A centred Gaussian map: the baseline a map must beat to be finding the object."""
    ys = (torch.arange(gh) + 0.5) / gh - 0.5
    xs = (torch.arange(gw) + 0.5) / gw - 0.5
    return torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * 0.25**2))


@torch.no_grad()
def evaluate_maps(
    model: torch.nn.Module,
    samples: list[tuple[str, torch.Tensor, torch.Tensor]],
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    threshold: float = 0.6,
    batch_size: int = 128,
    examples: int = 0,
    example_dir: str | None = None,
) -> dict[str, Any]:
    """Mean Jaccard and CorLoc (percent) of the pooling map over ``samples`` (a list of
    (name, uint8 image (3, h, w), bool mask (h, w))); for [CLS] models also per head."""
    per_head, pooled_j, hits, prior_j, prior_hits = [], [], [], [], []
    starts = range(0, len(samples), batch_size)
    for start in utils.MetricLogger().log_every(starts, 1, header=f"attention maps ({len(samples)} images)"):
        chunk = samples[start : start + batch_size]
        groups = {}
        for s in chunk:  # equal sizes batch together
            groups.setdefault(tuple(s[1].shape), []).append(s)
        for group in groups.values():
            x = _normalize(torch.stack([s[1] for s in group]), mean, std)
            maps = attention_maps(model, x)  # (b, heads, gh, gw)
            for (name, image, mask), m in zip(group, maps):
                r = score_map(m.mean(0), mask, patch_size, threshold)
                pooled_j.append(r["jaccard"])
                hits.append(r["hit"])
                if m.shape[0] > 1:
                    per_head.append([score_map(h, mask, patch_size, threshold)["jaccard"] for h in m])
                p = score_map(center_prior(*m.shape[-2:]), mask, patch_size, threshold)
                prior_j.append(p["jaccard"])
                prior_hits.append(p["hit"])
                if len(pooled_j) <= examples and example_dir:
                    img = image.permute(1, 2, 0).numpy()
                    save_panel(
                        [img, _mask_rgb(mask), overlay(img, m.mean(0)), _mask_rgb(r["kept"])],
                        os.path.join(example_dir, f"{len(pooled_j) - 1:04d}_{name}.png"),
                    )
    out = {
        "jaccard": 100 * float(np.mean(pooled_j)),
        "corloc": 100 * float(np.mean(hits)),
        "center_prior": {"jaccard": 100 * float(np.mean(prior_j)), "corloc": 100 * float(np.mean(prior_hits))},
        "n_images": len(pooled_j),
    }
    if per_head:
        heads = 100 * np.mean(np.array(per_head), axis=0)
        out["per_head_jaccard"] = [round(float(v), 2) for v in heads]
        out["best_head"] = int(heads.argmax())
        out["best_head_jaccard"] = float(heads.max())
    return out


# ---------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simpool.attention",
        description="Attention maps of a SimPool-SSL backbone: overlays and mask quality",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("maps")
    g.add_argument(
        "--images",
        default=[],
        nargs="+",
        type=str,
        help="Images to draw: each gives "
        "OUTPUT_DIR/<name>_attention.png with the image and its attention overlaid (per head too, "
        "for [CLS] models).",
    )
    g.add_argument(
        "--image_size",
        default=None,
        type=number(int, low=1),
        help="Short side (pixels) the model sees; "
        "default: the checkpoint's training size. Maps are upsampled back to each image's resolution.",
    )
    g.add_argument(
        "--normalize",
        default="auto",
        choices=["auto", "imagenet", FASHION_MNIST],
        help="Input normalisation statistics; auto: those of the data the checkpoint was trained on.",
    )
    g.add_argument(
        "--display_size",
        default=224,
        type=number(int, low=1, high=4096),
        help="Minimum height of "
        "the written panels, up to 4096 (a panel is 4 tiles wide); smaller images are enlarged (nearest).",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="Score the maps against object masks: Jaccard of the "
        "top-mass token mask, and CorLoc; writes OUTPUT_DIR/attention.json.",
    )
    g.add_argument(
        "--mask_dir",
        default=None,
        type=str,
        help="Your own image/mask pairs (images/<name>.jpg + "
        "masks/<name>.png, or <name>.jpg + <name>_mask.png); default: the built-in synthetic set.",
    )
    g.add_argument("--num_images", default=500, type=number(int, low=1), help="Size of the built-in synthetic set.")
    g.add_argument(
        "--object_scale",
        default=(0.5, 0.9),
        type=number(float, above=0, below=1),
        nargs=2,
        help="Synthetic set: range of an item's side as a fraction of the image side.",
    )
    g.add_argument(
        "--background_gain", default=0.5, type=number(float, low=0), help="Synthetic set: texture brightness factor."
    )
    g.add_argument(
        "--threshold",
        default=0.6,
        type=number(float, low=0, high=1),
        help="Fraction of the attention mass the kept tokens hold (DINO: 0.6).",
    )
    g.add_argument(
        "--save_examples",
        default=8,
        type=number(int, low=0),
        help="Write this many evaluation panels (image, mask, map, kept tokens) to OUTPUT_DIR/examples.",
    )
    g.add_argument(
        "--seed",
        default=0,
        type=number(int, low=0, high=utils.MAX_SEED),
        help="Seed of the synthetic set (and of the weights of a random-init model).",
    )
    p.add_argument("--output_dir", default="attention", type=str, help="Where the PNGs and attention.json go.")
    add_precision_arg(p)
    p.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    return p


def draw_images(
    model: torch.nn.Module, info: dict[str, Any], args: argparse.Namespace, mean: Sequence[float], std: Sequence[float]
) -> list[str]:
    images = [(path, _open_image(path, "RGB")) for path in args.images]  # all readable before any work
    os.makedirs(args.output_dir, exist_ok=True)
    written, names = [], set()
    for path, image in images:
        x = _normalize(
            torch.from_numpy(
                np.asarray(resize_for_model(image, info["image_size"], map_cell_size(model))).copy()
            ).permute(2, 0, 1)[None],
            mean,
            std,
        )
        maps = attention_maps(model, x)[0]  # (heads, gh, gw)
        img = np.asarray(image)
        tiles = [img, overlay(img, maps.mean(0))]
        if maps.shape[0] > 1:
            tiles += [overlay(img, m) for m in maps]
        stem = name = os.path.splitext(os.path.basename(path))[0]
        for copy in itertools.count(2):  # a/x.jpg and b/x.png: x_attention.png and x_2_attention.png
            if name not in names:
                break
            name = f"{stem}_{copy}"
        names.add(name)
        out = os.path.join(args.output_dir, name + "_attention.png")
        save_panel(tiles, out, args.display_size)
        written.append(out)
        what = "SimPool map" if model.mode != "official" else f"[CLS] mean and {maps.shape[0]} heads"
        logger.info(f"{path}: {what} on a {maps.shape[1]}x{maps.shape[2]} grid -> {out}")
    return written


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    utils.setup_logging()
    if not args.images and not args.evaluate:
        raise AttentionError("nothing to do: give --images FILES and/or --evaluate")
    if not 0 < args.threshold <= 1:
        raise AttentionError(f"--threshold must be in (0, 1], got {args.threshold}")
    utils.require_low_first(args, "object_scale")
    utils.ensure_writable_dir(args.output_dir)  # before the model and the data are loaded
    torch.manual_seed(args.seed)  # a random-init baseline (no --pretrained_weights) is the same on every run
    model, info = load_pretrained(
        args.pretrained_weights,
        args.checkpoint_key,
        args.arch,
        args.patch_size,
        args.mode,
        args.gamma,
        image_size=args.image_size,
        resample_native_pos=args.resample_native_pos,
    )
    convnet = is_convnet(info["arch"])
    if convnet and info["mode"] == "official":
        raise AttentionError(
            f"{info['arch']} in official mode pools by global average and has no attention map; "
            "maps need a --mode simpool backbone"
        )
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = model.to(device)
    dtype = resolve_eval_precision(args, device)
    with autocast(device.type, dtype):
        return _draw_and_evaluate(model, info, args, convnet)


def _draw_and_evaluate(
    model: torch.nn.Module, info: dict[str, Any], args: argparse.Namespace, convnet: bool
) -> dict[str, Any] | None:
    mean, std = norm_stats(args.normalize, info)
    result = None
    if args.images:
        draw_images(model, info, args, mean, std)
    if args.evaluate:
        S, p = info["image_size"], map_cell_size(model)
        if convnet and S % p:  # whole feature-map cells, so each cell covers exactly p x p pixels
            S = max(p, round(S / p) * p)
            logger.info(f"{info['arch']}: evaluation images are {S}x{S} (a multiple of its stride {p}).")
        if args.mask_dir:
            samples = folder_set(args.mask_dir, S, p)
            source = f"{args.mask_dir} ({len(samples)} pairs)"
        else:
            if args.num_images < 1:
                raise AttentionError(f"--num_images must be positive, got {args.num_images}")
            images, masks = synthetic_set(args.num_images, S, args.seed, tuple(args.object_scale), args.background_gain)
            samples = [(f"synthetic{i}", im, m) for i, (im, m) in enumerate(zip(images, masks))]
            background = (
                "black"
                if args.background_gain == 0
                else "scikit-image textures" + (f" x {args.background_gain}" if args.background_gain != 0.5 else "")
            )
            source = f"synthetic: {args.num_images} Fashion-MNIST test items on {background}, {S}x{S}, seed {args.seed}"
        example_dir = os.path.join(args.output_dir, "examples")
        os.makedirs(example_dir, exist_ok=True)
        result = evaluate_maps(
            model, samples, mean, std, p, args.threshold, examples=args.save_examples, example_dir=example_dir
        )
        kind = "SimPool attention" if info["mode"] != "official" else "[CLS] attention (mean of heads)"
        name = info["arch"] if convnet else f"{info['arch']}/{p}"
        print(f"{kind} of {name} on {source}:")
        print(f"  Jaccard (top {args.threshold:.0%} mass) {result['jaccard']:6.2f}   CorLoc {result['corloc']:6.2f}")
        if "best_head" in result:
            print(
                f"  per head Jaccard {result['per_head_jaccard']}  (best: head {result['best_head']}, "
                f"{result['best_head_jaccard']:.2f})"
            )
        print(
            f"  centre-prior baseline: Jaccard {result['center_prior']['jaccard']:6.2f}   "
            f"CorLoc {result['center_prior']['corloc']:6.2f}"
        )
        record = {
            **result,
            "threshold": args.threshold,
            "dataset": source,
            "pretrained_weights": args.pretrained_weights or None,
            "checkpoint_key": args.checkpoint_key,
            "map": "simpool" if info["mode"] != "official" else "cls_mean_of_heads",
            "model": {k: info.get(k) for k in ("arch", "patch_size", "mode", "gamma", "image_size", "epoch")},
        }
        path = os.path.join(args.output_dir, "attention.json")
        utils.write_json(path, record)
        logger.info(f"Wrote {path} and {min(args.save_examples, result['n_images'])} example panels in {example_dir}.")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = get_args_parser().parse_args(argv)
    return utils.run_command(run, args)


if __name__ == "__main__":
    main()
