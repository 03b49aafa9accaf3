"""Interactive attention viewer: a local web page showing what SimPool sees, what AttMask
hides and which training images the model finds nearest.

    python -m simpool.viewer --pretrained_weights output/checkpoint.pth
    python -m simpool.viewer --pretrained_weights simpool.pth --compare dino.pth --data_path /imagenet --subset 10

Needs the ``viewer`` extra (``pip install -e ".[viewer]"``: Gradio and scikit-image). The page
serves from 127.0.0.1 (``--host`` to change it) without any network access, and reads no
files but the checkpoints and ``--data_path``. For the image you upload or pick it shows:

  * the attention map overlaid at the image's own size: SimPool's map (and each head's where
    SimPool has several), the mean [CLS] attention and each head's for ``--mode official``
    ViTs, SimPool's map over a convnet's last feature map (``simpool.attention``);
  * the tokens holding the chosen share of the attention mass (``mass_mask``, 60% by default,
    as ``--evaluate``) and, for images that come with an object mask, their Jaccard index;
  * the masks AttMask would draw for each ``--pred_shape`` (``simpool.masking.make_masks``,
    the function training calls, with ``masking_prob`` 1);
  * the k nearest images of ``--data_path``'s training split by cosine similarity of the
    pooled features (``simpool.knn``), computed once and cached beside the checkpoint;
  * with ``--compare``, all of it for a second checkpoint, side by side.

The page is a thin Gradio layer (``build_app``) over plain functions of arrays
(``analyse``, ``attention_views``, ``threshold_view``, ``mask_views``, ``neighbour_views``,
``compute_views``), which the tests compare with the library functions they call.

Example:
    >>> import io
    >>> buffer = io.BytesIO(); Image.new("LA", (40, 30)).save(buffer, "PNG")
    >>> image, note = read_image(buffer)
    >>> image.shape, image.dtype.name, note
    ((30, 40, 3), 'uint8', 'grayscale image with transparency, composited on white')
    >>> for_display(image, 256).shape  # small images are enlarged (nearest) for the page
    (180, 240, 3)
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from simpool import utils
from simpool.attention import (
    AttentionError,
    _normalize,
    attention_maps,
    jaccard,
    map_cell_size,
    mass_mask,
    norm_stats,
    overlay,
    resize_for_model,
    synthetic_set,
    token_mask_to_pixels,
)
from simpool.augment import eight_bit
from simpool.backbones import ConvNetBackbone, supports_masking
from simpool.checkpoints import AUTO, add_model_args, load_pretrained
from simpool.data import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    build_dataset,
    eval_transform,
    load_fashion_mnist,
)
from simpool.evaluation import (
    FrozenFeatures,
    add_precision_arg,
    is_in_memory,
    resolve_eval_precision,
    tolerant_collate,
)
from simpool.knn import extract_features, knn_search
from simpool.masking import PRED_SHAPES, make_masks
from simpool.utils import number, subset_size

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import BinaryIO

    import gradio

    from simpool.data import InMemoryImages, SafeImageFolder

logger = logging.getLogger("simpool")
__all__ = [
    "ViewerError",
    "Backbone",
    "Bank",
    "Analysis",
    "Views",
    "read_image",
    "for_display",
    "example_names",
    "load_example",
    "load_backbone",
    "build_bank",
    "feature_cache_path",
    "analyse",
    "attention_views",
    "threshold_view",
    "mask_views",
    "neighbour_views",
    "compute_views",
    "build_app",
    "main",
]

MAX_SIDE = 1024  # longer side of the working copy of an upload; larger images are downscaled
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS's default)
DISPLAY_SIDE = 256  # small images are enlarged (nearest, by a whole factor) to about this for the page
THRESHOLD = 0.6  # attention mass kept (DINO's and --evaluate's 60%)
PHOTOS = ("astronaut", "chelsea", "coffee")  # scikit-image's bundled photos
FASHION_EXAMPLES = 8  # Fashion-MNIST test items 0..7
COMPOSITES = 6  # --evaluate's synthetic set (seed 0), items 0..5
NO_DATA = "none"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ViewerError(utils.UserError, ValueError):
    """A user-facing problem (a bad upload, a busy port); its message is one line."""


# ---------------------------------------------------------------- images
def read_image(source: str | os.PathLike[str] | BinaryIO, max_side: int = MAX_SIDE) -> tuple[np.ndarray, str]:
    """An uploaded file (path or file object) as uint8 RGB (H, W, 3) and a note ('' or one
    line on what was done to it). Grayscale, 16-bit, palette and CMYK images become RGB,
    transparency is composited on white, EXIF rotation applied; an image whose longer side
    exceeds ``max_side`` is downscaled (a JPEG over PIL's decompression-bomb limit is decoded
    at a reduced scale first; any other image over it is refused). Anything unreadable is
    one ``ViewerError`` line."""
    name = os.path.basename(str(source)) if isinstance(source, (str, os.PathLike)) else "the upload"
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, in one line
            im = Image.open(source)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS and im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # DCT scaling: decode at 1/2 .. 1/8 of the size
                notes.append(f"{w}x{h} JPEG decoded at {im.size[0]}x{im.size[1]}")
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ViewerError(
                    f"{name} is {w}x{h} pixels ({w * h / 1e6:.0f} Mpx), more than the "
                    f"{MAX_PIXELS / 1e6:.0f} Mpx the viewer decodes; downscale it first"
                )
            im.load()
            rgb, note = _to_rgb(im)
    except ViewerError:
        raise
    except Image.DecompressionBombError:
        raise ViewerError(
            f"{name} is larger than the {2 * MAX_PIXELS / 1e6:.0f} Mpx PIL opens at all; downscale it first"
        ) from None
    except FileNotFoundError:
        raise ViewerError(f"{name}: no such file") from None
    except Exception as e:  # PIL raises many kinds for non-images and truncated files
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise ViewerError(f"{name} is not a readable image ({reason})") from None
    if note:
        notes.append(note)
    if max(rgb.size) > max_side:
        before = rgb.size
        rgb.thumbnail((max_side, max_side), Image.LANCZOS)
        notes.append(f"downscaled from {before[0]}x{before[1]} to {rgb.size[0]}x{rgb.size[1]}")
    return np.asarray(rgb).copy(), "; ".join(notes)


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """(RGB PIL image, note) from any decoded PIL image."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    mode = im.mode
    im = eight_bit(im)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        what = "grayscale image with transparency" if mode == "LA" else f"{mode} image with transparency"
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{what}, composited on white"
    if mode == "RGB":
        return im, ""
    gray = mode in ("1", "L", "I", "F") or mode.startswith("I;16")
    note = f"grayscale ({mode}) image, used as RGB" if gray else f"{mode} image converted to RGB"
    return im.convert("RGB"), note


def for_display(image: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """A uint8 (H, W, 3) image enlarged by the largest whole factor (nearest) that keeps its
    longer side within ``side``; images at least that large come back as they are."""
    longest = max(image.shape[:2])
    if longest >= side:
        return image
    scale = max(1, side // longest)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _as_rgb(chw: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) tensor, C 1 or 3 -> numpy (H, W, 3)."""
    a = torch.as_tensor(chw).as_subclass(torch.Tensor).cpu()
    if a.shape[0] == 1:
        a = a.expand(3, -1, -1)
    return a.permute(1, 2, 0).contiguous().numpy()


def _resize_bool(mask: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Boolean (h, w) mask (tensor or array) -> bool tensor at ``size`` = (H, W), nearest, as
    ``simpool.attention.folder_set`` resizes a mask to its image."""
    m = np.asarray(torch.as_tensor(mask).bool().cpu().numpy(), dtype=np.uint8) * 255
    if m.shape != tuple(size):
        m = np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.NEAREST))
    return torch.from_numpy(m > 0)


# ---------------------------------------------------------------- examples
def example_names(data_path: str) -> list[str]:
    """The bundled examples: scikit-image's photos always; Fashion-MNIST test items and
    ``--evaluate``'s textured composites (which come with object masks) when ``data_path``
    is Fashion-MNIST (the files the viewer may read)."""
    names = [f"photo: {p}" for p in PHOTOS]
    if data_path == FASHION_MNIST:
        names += [f"Fashion-MNIST test item {i}" for i in range(FASHION_EXAMPLES)]
        names += [f"composite {i} (with mask)" for i in range(COMPOSITES)]
    return names


def load_example(name: str, composite_size: int = 28) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 (H, W, 3), bool (H, W) object mask or None, description) of an example of
    ``example_names``; composites are ``synthetic_set(COMPOSITES, composite_size, seed=0)``."""
    if name.startswith("photo: ") and name[7:] in PHOTOS:
        try:
            import skimage.data
        except ImportError:
            raise ViewerError("the photo examples need scikit-image (pip install -e '.[viewer]')") from None
        image = getattr(skimage.data, name[7:])()
        return image, None, f"scikit-image's {name[7:]} photo"
    if name.startswith("Fashion-MNIST test item "):
        i = int(name.rsplit(" ", 1)[1])
        images, labels = _fashion_test()
        item = images[i, 0].numpy()
        return (
            np.repeat(item[..., None], 3, axis=2),
            item > 0,
            f"Fashion-MNIST test item {i} ({FASHION_MNIST_CLASSES[int(labels[i])]}), mask: its pixels > 0",
        )
    if name.startswith("composite "):
        i = int(name.split()[1])
        images, masks = _composites(composite_size)
        return (
            images[i].permute(1, 2, 0).numpy(),
            masks[i].numpy(),
            f"composite {i} of --evaluate's synthetic set ({composite_size}x{composite_size}, seed 0), exact mask",
        )
    raise ViewerError(f"unknown example {name!r}")


@functools.lru_cache(maxsize=1)
def _fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist("test")


@functools.lru_cache(maxsize=4)
def _composites(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_set(COMPOSITES, size, seed=0)


# ---------------------------------------------------------------- models
@dataclasses.dataclass
class Bank:
    """The training images the neighbours are searched in: L2-normalised pooled features
    (N, d), labels (N,), each row's index in ``dataset`` (unreadable files are left out),
    and the normalisation the features were computed with."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    classes: list
    dataset: object
    mean: tuple
    std: tuple
    data_path: str


@dataclasses.dataclass
class Backbone:
    """A loaded backbone and what the views need of it."""

    model: torch.nn.Module
    info: dict
    path: str
    checkpoint_key: str
    mean: tuple
    std: tuple
    device: torch.device
    dtype: object = None  # autocast dtype (None: fp32)
    precision: str = "fp32"
    tag: str = "A"
    bank: Bank = None

    def __post_init__(self) -> None:
        self.features = FrozenFeatures(self.model)  # the k-NN evaluation's features (n_last_blocks 1)

    @property
    def cell(self) -> int:
        """Pixels per map cell (a ViT's patch, a convnet's 32-pixel stride)."""
        return map_cell_size(self.model)

    @property
    def has_map(self) -> bool:
        return not (isinstance(self.model, ConvNetBackbone) and self.model.simpool is None)

    @property
    def label(self) -> str:
        i = self.info
        arch = i["arch"] if i.get("patch_size") is None else f"{i['arch']}/{i['patch_size']}"
        epoch = f", epoch {i['epoch']}" if i.get("epoch") is not None else ""
        return f"{self.tag}: {arch} ({i['mode']}) at {i['image_size']} px{epoch} - {os.path.basename(self.path)}"

    @property
    def map_kind(self) -> str:
        if not self.has_map:
            return "no attention map: this convnet pools by global average (official mode)"
        if isinstance(self.model, ConvNetBackbone):
            return "SimPool attention over the last feature map (32-pixel cells)"
        if self.info["mode"] == "official":
            return "[CLS] attention of the last block: mean of the heads, then each head"
        return "SimPool attention"

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)


def load_backbone(
    path: str,
    checkpoint_key: str = "teacher",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    precision: str = "fp32",
    tag: str = "A",
    normalize: str = "auto",
    image_size: int | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    mode: str | None = None,
    gamma: str | float | None = AUTO,
    resample_native_pos: bool | None = None,
) -> Backbone:
    """``load_pretrained`` with the viewer's settings: a ``Backbone`` on ``device``."""
    model, info = load_pretrained(
        path,
        checkpoint_key,
        arch,
        patch_size,
        mode,
        gamma,
        image_size=image_size,
        resample_native_pos=resample_native_pos,
    )
    device = torch.device(device)
    mean, std = norm_stats(normalize, info)
    return Backbone(model.to(device).eval(), info, path, checkpoint_key, mean, std, device, dtype, precision, tag)


# ---------------------------------------------------------------- neighbours' features
def _cache_key(
    bb: Backbone, data_path: str, subset: int | None, dataset: InMemoryImages | SafeImageFolder
) -> dict[str, Any]:
    st = os.stat(bb.path)
    files = (
        hashlib.sha1("\n".join(p for p, _ in dataset.samples).encode()).hexdigest()
        if not is_in_memory(dataset)
        else None
    )
    return {
        "checkpoint_size": st.st_size,
        "checkpoint_mtime_ns": st.st_mtime_ns,
        "checkpoint_key": bb.checkpoint_key,
        "data_path": data_path if data_path == FASHION_MNIST else os.path.abspath(data_path),
        "subset": subset,
        "n_images": len(dataset),
        "files": files,
        "image_size": bb.info["image_size"],
        "arch": bb.info["arch"],
        "patch_size": bb.info.get("patch_size"),
        "mode": bb.info["mode"],
        "gamma": bb.info.get("gamma"),
        "resample_native_pos": bool(bb.info.get("resample_native_pos")),
        "precision": bb.precision,
        "features": bb.features.settings(),
    }


def feature_cache_path(bb: Backbone, key: dict[str, Any]) -> str:
    """``CKPT.viewer_features.<checkpoint key>.<hash>.pt``: one file per data set and feature
    settings; the checkpoint's size and mtime, kept inside, decide whether it is still valid."""
    stable = {k: v for k, v in key.items() if not k.startswith("checkpoint_") or k == "checkpoint_key"}
    digest = hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{bb.path}.viewer_features.{bb.checkpoint_key}.{digest}.pt"


def build_bank(
    bb: Backbone,
    data_path: str,
    subset: int | None = -1,
    batch_size: int = 256,
    num_workers: int = 2,
    cache: bool = True,
) -> Bank:
    """The ``Bank`` of ``data_path``'s training split for ``bb``: features from
    ``simpool.knn.extract_features`` (progress logged), read from / written to
    ``feature_cache_path`` beside the checkpoint (atomically) while the checkpoint, the data
    and the settings are unchanged; a folder that cannot be written keeps them in memory."""
    S = bb.info["image_size"]
    dataset = build_dataset(data_path, "train", subset, transform=eval_transform(S), split_folder_ok=True)
    classes = list(dataset.classes)
    path = key = None
    if cache and bb.path and os.path.isfile(bb.path):
        key = _cache_key(bb, data_path, subset, dataset)
        path = feature_cache_path(bb, key)
        cached = _read_cache(path, key)
        if cached is not None:
            logger.info(f"{bb.tag}: features of {len(cached['index'])} training images read from {path}.")
            return Bank(
                cached["features"],
                cached["labels"],
                cached["index"],
                classes,
                dataset,
                dataset.mean,
                dataset.std,
                data_path,
            )
    logger.info(
        f"{bb.tag}: computing the features of {len(dataset)} training images of {data_path} "
        f"(once{'; cached in ' + path if path else ''})."
    )
    kw = dict(
        batch_size=batch_size, device=bb.device, image_size=S, amp_dtype=bb.dtype, header=f"{bb.tag}: training features"
    )
    if not is_in_memory(dataset):
        kw.update(num_workers=num_workers, collate=tolerant_collate(S))
    feats, labels = extract_features(bb.features, dataset, **kw)
    keep = labels >= 0  # tolerant_collate's unreadable files
    if not bool(keep.all()):
        logger.warning(f"{int((~keep).sum())} unreadable training images left out.")
    bank = Bank(
        feats[keep].contiguous(),
        labels[keep].contiguous(),
        torch.arange(len(labels))[keep],
        classes,
        dataset,
        dataset.mean,
        dataset.std,
        data_path,
    )
    if path is not None:
        try:
            utils.save_checkpoint(
                {"key": key, "features": bank.features, "labels": bank.labels, "index": bank.index}, path
            )
            logger.info(f"{bb.tag}: features cached in {path}.")
        except utils.RunError as e:
            logger.warning(f"warning: features not cached ({e}); they will be computed again next time.")
    return bank


def _read_cache(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        cached = utils.load_checkpoint(path)
    except utils.RunError as e:
        logger.warning(f"warning: ignoring the feature cache {path} ({e}).")
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        logger.info(f"{path} is stale (the checkpoint, the data or the settings changed): recomputing.")
        return None
    return cached


# ---------------------------------------------------------------- views
@dataclasses.dataclass
class Analysis:
    """One image through one backbone: the uint8 model input (1, 3, h, w)
    (``resize_for_model``, as ``simpool.attention`` draws), the maps (heads, gh, gw) of
    ``attention_maps`` (None without one), the AttMask ranking (1, N) and the L2-normalised
    pooled feature (d,) (None without a bank)."""

    pixels: torch.Tensor
    grid: tuple
    maps: torch.Tensor = None
    ranking: torch.Tensor = None
    feature: torch.Tensor = None


@torch.no_grad()
def analyse(bb: Backbone, image: np.ndarray) -> Analysis:
    """The model's passes over ``image`` (uint8 (H, W, 3)): an ``Analysis``."""
    pixels = torch.from_numpy(
        np.asarray(resize_for_model(Image.fromarray(image), bb.info["image_size"], bb.cell)).copy()
    ).permute(2, 0, 1)[None]
    x = _normalize(pixels, bb.mean, bb.std)
    grid = tuple(bb.model.grid_size(*x.shape[-2:]))
    out = Analysis(pixels, grid)
    with bb.autocast():
        if bb.has_map:
            out.maps = attention_maps(bb.model, x)[0]
            # training ranks patches by the pooling attention: SimPool's map, or the [CLS] attention's mean
            out.ranking = out.maps.mean(0).reshape(1, -1)
        if bb.bank is not None:
            if (tuple(bb.bank.mean), tuple(bb.bank.std)) != (tuple(bb.mean), tuple(bb.std)):
                x = _normalize(pixels, bb.bank.mean, bb.bank.std)  # as the bank's images were
            f = bb.features(x.to(bb.device)).float()
            out.feature = F.normalize(f, dim=1)[0].cpu()
    return out


def attention_views(bb: Backbone, image: np.ndarray, an: Analysis) -> list[tuple[np.ndarray, str]]:
    """[(overlay uint8 (H, W, 3) at the image's size, caption)]: the pooling map (the mean of
    the heads), then each head where there are several (``simpool.attention.overlay``)."""
    if an.maps is None:
        return []
    heads = an.maps.shape[0]
    first = (
        "[CLS] attention, mean of heads"
        if bb.info["mode"] == "official"
        else "SimPool map" + (f", mean of {heads} heads" if heads > 1 else "")
    )
    views = [(overlay(image, an.maps.mean(0)), first)]
    if heads > 1:
        views += [(overlay(image, m), f"head {i}") for i, m in enumerate(an.maps)]
    return views


def threshold_view(
    bb: Backbone,
    image: np.ndarray,
    mask: np.ndarray | torch.Tensor | None,
    an: Analysis,
    threshold: float = THRESHOLD,
) -> tuple[np.ndarray | None, str, float | None, torch.Tensor | None]:
    """(uint8 (H, W, 3): the image where the kept tokens are, dimmed elsewhere; one-line
    caption; Jaccard or None; kept token mask (gh, gw)). The kept tokens hold ``threshold``
    of the pooling map's mass (``mass_mask``); with an object ``mask`` (H, W), the Jaccard of
    their pixels at the model's resolution with the mask resized there, as ``score_map``."""
    if an.maps is None:
        return None, bb.map_kind, None, None
    amap = an.maps.mean(0)
    keep = mass_mask(amap.flatten(), threshold).view(amap.shape)
    size = tuple(an.pixels.shape[-2:])
    kept = token_mask_to_pixels(keep, bb.cell, size)
    score = None
    caption = f"{int(keep.sum())} of {keep.numel()} tokens hold {threshold:.0%} of the attention mass"
    if mask is not None:
        score = jaccard(kept, _resize_bool(mask, size))
        caption += f"; Jaccard with the object mask {score:.3f}"
    shown = _resize_bool(kept, image.shape[:2]).numpy()[..., None]
    img = image.astype(np.float32)
    dimmed = img * 0.25 + np.array([0, 0, 48], np.float32)
    return np.where(shown, img, dimmed).clip(0, 255).round().astype(np.uint8), caption, score, keep


_PY_RANDOM = threading.Lock()  # block masks draw from Python's global random, seeded per request


def draw_mask(
    ranking: torch.Tensor,
    grid: tuple[int, int],
    pred_shape: str,
    pred_ratio: float,
    show_max: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """One (N,) boolean mask (True = hidden) of ``make_masks`` for a crop ranked by
    ``ranking`` (1, N), with ``masking_prob`` 1 and a fixed ratio, from a CPU generator seeded
    with ``seed`` (and, for ``block``, Python's ``random`` seeded with it, restored after)."""
    generator = torch.Generator().manual_seed(int(seed))
    with _PY_RANDOM:
        state = random.getstate()
        random.seed(int(seed))
        try:
            return make_masks(
                ranking,
                grid,
                pred_shape,
                pred_ratio=pred_ratio,
                pred_ratio_var=0.0,
                masking_prob=1.0,
                show_max=show_max,
                generator=generator,
            )[0]
        finally:
            random.setstate(state)


def mask_views(
    bb: Backbone, image: np.ndarray, an: Analysis, pred_ratio: float = 0.3, show_max: float = 0.1, seed: int = 0
) -> list[tuple[str, torch.Tensor, np.ndarray, str]]:
    """[(pred_shape, mask (N,), uint8 (H, W, 3) with the hidden patches greyed, caption)] for
    every ``PRED_SHAPES`` mode (``rand`` and ``block`` only for a model without a map)."""
    N = an.grid[0] * an.grid[1]
    ranking = an.ranking if an.ranking is not None else torch.zeros(1, N)
    shapes = PRED_SHAPES if an.ranking is not None else ("rand", "block")
    size = tuple(an.pixels.shape[-2:])
    img = image.astype(np.float32)
    grey = img * 0.3 + 0.7 * 160
    out = []
    for shape in shapes:
        m = draw_mask(ranking, an.grid, shape, pred_ratio, show_max, seed)
        hidden = _resize_bool(token_mask_to_pixels(m.view(an.grid), bb.cell, size), image.shape[:2]).numpy()
        drawn = np.where(hidden[..., None], grey, img).round().astype(np.uint8)
        out.append((shape, m, drawn, f"{shape} {int(m.sum())}/{N}"))
    return out


def neighbour_views(bb: Backbone, an: Analysis, k: int = 8) -> list[tuple[np.ndarray, str, float, int, int]]:
    """[(uint8 (h, w, 3) training image, caption, cosine similarity, dataset index, label)] of
    the ``k`` nearest training images by pooled feature (``simpool.knn.knn_search``)."""
    if bb.bank is None or an.feature is None:
        return []
    sims, idx = knn_search(bb.bank.features, an.feature[None], k)
    out = []
    for s, j in zip(sims[0].tolist(), idx[0].tolist()):
        i = int(bb.bank.index[j])
        label = int(bb.bank.labels[j])
        sample = bb.bank.dataset[i]
        thumb = np.full((32, 32, 3), 128, np.uint8) if isinstance(sample, str) else _as_rgb(sample[0])
        name = bb.bank.classes[label] if 0 <= label < len(bb.bank.classes) else str(label)
        out.append((thumb, f"{name} {s:.3f}", s, i, label))
    return out


@dataclasses.dataclass
class Views:
    """Everything the page shows for one image and one backbone."""

    attention: list
    kept: np.ndarray
    kept_caption: str
    jaccard: float
    masks: list
    neighbours: list


def compute_views(
    bb: Backbone,
    image: np.ndarray,
    mask: np.ndarray | torch.Tensor | None = None,
    threshold: float = THRESHOLD,
    pred_ratio: float = 0.3,
    show_max: float = 0.1,
    seed: int = 0,
    k: int = 8,
) -> tuple[Analysis, Views]:
    """(``Analysis``, ``Views``) of ``image`` (uint8 (H, W, 3)) for ``bb``."""
    an = analyse(bb, image)
    kept, caption, score, _ = threshold_view(bb, image, mask, an, threshold)
    return an, Views(
        attention_views(bb, image, an),
        kept,
        caption,
        score,
        mask_views(bb, image, an, pred_ratio, show_max, seed),
        neighbour_views(bb, an, k),
    )


# ---------------------------------------------------------------- the page
def _gradio() -> ModuleType:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check, no telemetry
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise ViewerError("the viewer needs Gradio: pip install -e '.[viewer]'") from None
    return gradio


CSS = ".viewer-note {font-size: 0.9em; opacity: 0.8}"


class Page:
    """The page's event handlers over the pure views: each returns the values of its outputs
    (lists of (image, caption) for galleries, arrays for images, strings for text)."""

    def __init__(self, backbones: Sequence[Backbone], data_path: str) -> None:
        self.backbones = backbones
        self.examples = example_names(data_path)
        S, p = backbones[0].info["image_size"], backbones[0].cell
        self.composite_size = max(p, round(S / p) * p)  # whole cells, as --evaluate makes them

    # one image: every view of every backbone
    def open(
        self,
        kind: str,
        value: str | None,
        threshold: float,
        pred_ratio: float,
        show_max: float,
        seed: float | None,
        k: float,
    ) -> list[Any]:
        if not value:
            return self._unchanged("Upload an image or pick an example.")
        try:
            if kind == "upload":
                image, note = read_image(value)
                mask, what = None, os.path.basename(str(value))
            else:
                image, mask, what = load_example(value, self.composite_size)
                note = ""
            start = time.perf_counter()
            session = {"image": image, "mask": mask, "analyses": [analyse(bb, image) for bb in self.backbones]}
            outputs = []
            for bb, an in zip(self.backbones, session["analyses"]):
                outputs += (
                    self._attention(bb, image, an)
                    + self._kept(bb, session, an, threshold)
                    + [self._masks(bb, image, an, pred_ratio, show_max, seed), self._neighbours(bb, an, k)]
                )
            took = time.perf_counter() - start
        except (ViewerError, AttentionError, ValueError) as e:
            return self._unchanged(f"⚠ {_one_line(e)}")
        except Exception as e:  # the server keeps serving; the console gets the traceback
            logger.exception("viewer: unexpected error")
            return self._unchanged(f"⚠ internal error: {type(e).__name__}: {_one_line(e)}")
        H, W = image.shape[:2]
        status = f"{what}: {W}x{H}" + (f" ({note})" if note else "") + f"; views in {took:.2f} s"
        return [session, status, for_display(image)] + outputs

    def _unchanged(self, status: str) -> list[Any]:
        gr = _gradio()
        return [gr.update(), status, gr.update()] + [gr.update()] * (5 * len(self.backbones))

    def _attention(self, bb: Backbone, image: np.ndarray, an: Analysis) -> list[list[tuple[np.ndarray, str]]]:
        views = attention_views(bb, image, an)
        return [[(for_display(v), c) for v, c in views]]

    def _kept(
        self, bb: Backbone, session: dict[str, Any], an: Analysis, threshold: float
    ) -> list[np.ndarray | str | None]:
        kept, caption, _, _ = threshold_view(bb, session["image"], session["mask"], an, threshold)
        return [None if kept is None else for_display(kept), caption]

    def _masks(
        self,
        bb: Backbone,
        image: np.ndarray,
        an: Analysis,
        pred_ratio: float,
        show_max: float,
        seed: float | None,
    ) -> list[tuple[np.ndarray, str]]:
        return [(for_display(d), c) for _, _, d, c in mask_views(bb, image, an, pred_ratio, show_max, int(seed or 0))]

    def _neighbours(self, bb: Backbone, an: Analysis, k: float) -> list[tuple[np.ndarray, str]]:
        return [(for_display(t, 128), c) for t, c, *_ in neighbour_views(bb, an, int(k))]

    # one setting changed: only the views it affects
    def threshold(self, session: dict[str, Any] | None, threshold: float) -> list[Any]:
        if not session:
            return [_gradio().update()] * (2 * len(self.backbones))
        out = []
        for bb, an in zip(self.backbones, session["analyses"]):
            out += self._kept(bb, session, an, threshold)
        return out

    def masks(
        self, session: dict[str, Any] | None, pred_ratio: float, show_max: float, seed: float | None
    ) -> list[Any]:
        if not session:
            return [_gradio().update()] * len(self.backbones)
        return [
            self._masks(bb, session["image"], an, pred_ratio, show_max, seed or 0)
            for bb, an in zip(self.backbones, session["analyses"])
        ]

    def neighbours(self, session: dict[str, Any] | None, k: float) -> list[Any]:
        if not session:
            return [_gradio().update()] * len(self.backbones)
        return [self._neighbours(bb, an, k) for bb, an in zip(self.backbones, session["analyses"])]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class ImageFiles:
    """The arrays the page shows, written as JPEG files (quality 92, no chroma subsampling) in a
    folder of the system's temp dir, from where Gradio copies them into its cache: ~1 ms an
    image, where Gradio's own PNG encoding takes ~80 ms for a 512-pixel overlay (1.5 s for the
    ~20 images of one photo in --compare). Only the newest ``keep`` files are kept; the folder
    goes at exit."""

    def __init__(self, keep: int = 2000) -> None:
        self.folder = tempfile.mkdtemp(prefix="simpool-viewer-")
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        self.keep, self.written, self.lock = keep, collections.deque(), threading.Lock()

    def path(self, image: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=92, subsampling=0)
        data = buffer.getvalue()
        path = os.path.join(self.folder, hashlib.sha1(data).hexdigest()[:24] + ".jpg")
        with self.lock:
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
                self.written.append(path)
                while len(self.written) > self.keep:
                    with contextlib.suppress(OSError):
                        os.remove(self.written.popleft())
        return path

    def convert(self, value: Any) -> Any:
        """An image array -> its file; a gallery's [(array, caption)] -> [(file, caption)]; others as they are."""
        if isinstance(value, np.ndarray):
            return self.path(value)
        if isinstance(value, list) and all(isinstance(v, tuple) and isinstance(v[0], np.ndarray) for v in value):
            return [(self.path(v), c) for v, c in value]
        return value

    def wrap(self, handler: Callable[..., Sequence[Any]]) -> Callable[..., list[Any]]:
        return lambda *args: [self.convert(v) for v in handler(*args)]


def build_app(backbones: Sequence[Backbone], data_path: str = FASHION_MNIST) -> gradio.Blocks:
    """The Gradio page (a ``gradio.Blocks``) over ``backbones`` (one, or two side by side)."""
    gr = _gradio()
    page = Page(backbones, data_path)
    files = ImageFiles()
    with gr.Blocks(title="SimPool viewer", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("## SimPool attention viewer\n" + "  \n".join(f"**{bb.label}**" for bb in backbones))
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
                example = gr.Dropdown(choices=page.examples, value=None, label="…or pick an example", elem_id="example")
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                shown = gr.Image(label="Image", type="filepath", interactive=False, elem_id="image")
                threshold = gr.Slider(
                    0.05,
                    1.0,
                    value=THRESHOLD,
                    step=0.05,
                    label="Attention mass kept (threshold of --evaluate)",
                    elem_id="threshold",
                )
                pred_ratio = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="--pred_ratio", elem_id="pred_ratio")
                show_max = gr.Slider(
                    0.0, 1.0, value=0.1, step=0.05, label="--show_max (attmask_hint)", elem_id="show_max"
                )
                seed = gr.Number(0, precision=0, minimum=0, label="Mask seed", elem_id="seed")
                k = gr.Slider(1, 32, value=8, step=1, label="Neighbours (k)", elem_id="k")
            with gr.Column(scale=3):
                comps = {name: [] for name in ("attention", "kept", "kept_text", "masks", "neighbours")}
                sections = [
                    ("attention", "Attention map"),
                    ("kept", "Tokens kept at the threshold"),
                    ("masks", "AttMask masks (simpool.masking.make_masks)"),
                    ("neighbours", "Nearest training images (cosine similarity of pooled features)"),
                ]
                for name, title in sections:
                    gr.Markdown(f"### {title}")
                    with gr.Row():
                        for i, bb in enumerate(backbones):
                            with gr.Column():
                                if name == "attention":
                                    gr.Markdown(f"{bb.tag}: {bb.map_kind}", elem_classes=["viewer-note"])
                                    comps[name].append(
                                        gr.Gallery(
                                            label=bb.label,
                                            columns=3,
                                            fit_columns=False,
                                            height=300,
                                            object_fit="contain",
                                            elem_id=f"attention-{i}",
                                        )
                                    )
                                elif name == "kept":
                                    comps[name].append(
                                        gr.Image(
                                            label=bb.label, type="filepath", interactive=False, elem_id=f"kept-{i}"
                                        )
                                    )
                                    comps["kept_text"].append(gr.Markdown("", elem_id=f"kept-text-{i}"))
                                elif name == "masks":
                                    if not supports_masking(bb.model):
                                        gr.Markdown(
                                            f"{bb.tag}: a convnet has no patch tokens; training does not "
                                            "mask it (masks drawn on its map for reference).",
                                            elem_classes=["viewer-note"],
                                        )
                                    comps[name].append(
                                        gr.Gallery(
                                            label=bb.label,
                                            columns=3,
                                            fit_columns=False,
                                            height=300,
                                            object_fit="contain",
                                            elem_id=f"masks-{i}",
                                        )
                                    )
                                else:
                                    if bb.bank is None:
                                        gr.Markdown(
                                            f"{bb.tag}: no neighbours (--data_path {NO_DATA}).",
                                            elem_classes=["viewer-note"],
                                        )
                                    comps[name].append(
                                        gr.Gallery(
                                            label=bb.label,
                                            columns=4,
                                            fit_columns=False,
                                            height=290,
                                            object_fit="contain",
                                            elem_id=f"neighbours-{i}",
                                        )
                                    )
        per_model = [
            x
            for i in range(len(backbones))
            for x in (
                comps["attention"][i],
                comps["kept"][i],
                comps["kept_text"][i],
                comps["masks"][i],
                comps["neighbours"][i],
            )
        ]
        settings = [threshold, pred_ratio, show_max, seed, k]
        outputs = [session, status, shown] + per_model
        upload.upload(files.wrap(lambda path, *s: page.open("upload", path, *s)), [upload] + settings, outputs)
        example.input(files.wrap(lambda name, *s: page.open("example", name, *s)), [example] + settings, outputs)
        kept_outputs = [x for pair in zip(comps["kept"], comps["kept_text"]) for x in pair]
        threshold.change(files.wrap(page.threshold), [session, threshold], kept_outputs, trigger_mode="always_last")
        for control in (pred_ratio, show_max, seed):
            control.change(
                files.wrap(page.masks),
                [session, pred_ratio, show_max, seed],
                comps["masks"],
                trigger_mode="always_last",
            )
        k.change(files.wrap(page.neighbours), [session, k], comps["neighbours"], trigger_mode="always_last")
    return demo


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at ``host`` now (the OS's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(demo: gradio.Blocks, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start ``demo`` on host:port in the background (no share link, no analytics); its URL."""
    if port == 0:
        port = free_port(host)
    try:
        demo.queue(default_concurrency_limit=1)
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            quiet=True,
            inbrowser=False,
            show_error=False,
            max_file_size="200mb",
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
            css=CSS,
            footer_links=[],
        )
    except OSError as e:
        msg = _one_line(e)
        if "port" in msg.lower():
            raise ViewerError(
                f"port {port} on {host} is in use or not allowed (pass another --port, or --port 0 for a free one)"
            ) from None
        raise ViewerError(f"cannot serve on {host}:{port} ({msg})") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


# ---------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simpool.viewer",
        description="A local web page showing a backbone's attention map, the tokens it keeps, the masks AttMask "
        "would draw and its nearest training images; --compare shows a second checkpoint beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    for action in p._actions:
        if action.dest == "pretrained_weights":
            action.help = (
                "Checkpoint whose maps to show (required): a training checkpoint.pth, an exported "
                "backbone (.pth/.safetensors), or an official DINO/iBOT/AttMask/SimPool checkpoint."
            )
    g = p.add_argument_group("viewer")
    g.add_argument(
        "--compare",
        default=None,
        type=str,
        help="A second checkpoint shown side by side (e.g. a [CLS] "
        "model of the same budget); its architecture, mode and gamma are read from the file (--arch, "
        "--patch_size, --mode, --gamma, --resample_native_pos apply to --pretrained_weights only).",
    )
    g.add_argument(
        "--image_size",
        default=None,
        type=number(int, low=1),
        help="Short side (pixels) the models see; "
        "default: each checkpoint's training size. Maps are drawn back at each image's own size.",
    )
    g.add_argument(
        "--normalize",
        default="auto",
        choices=["auto", "imagenet", FASHION_MNIST],
        help="Input normalisation of the maps; auto: that of the data each checkpoint was trained on.",
    )
    g.add_argument(
        "--data_path",
        default=FASHION_MNIST,
        type=str,
        help="Where the neighbours come from: an "
        f"ImageFolder root with train/<class>/<image>, or '{FASHION_MNIST}' (its training split); "
        f"'{NO_DATA}': no neighbours view. Fashion-MNIST also adds its test items and --evaluate's "
        "composites to the examples.",
    )
    g.add_argument(
        "--subset",
        default=-1,
        type=subset_size,
        help="Search this many training images per class (-1: all), the first ones of each class.",
    )
    g.add_argument(
        "--batch_size",
        default=256,
        type=number(int, low=1),
        help="Images per batch when the "
        "training features are computed (once; then read from the cache beside the checkpoint).",
    )
    g.add_argument(
        "--num_workers",
        default=2,
        type=number(int, low=0),
        help="Data-loading workers for an ImageFolder's training features.",
    )
    g.add_argument(
        "--port",
        default=7860,
        type=number(int, low=0, high=65535),
        help="Port to serve on; 0: a free one (the address is printed).",
    )
    g.add_argument(
        "--host",
        default="127.0.0.1",
        type=str,
        help="Address to bind; 127.0.0.1 serves this machine "
        "only, 0.0.0.0 anyone who can reach it (a warning is printed).",
    )
    add_precision_arg(g)
    g.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    return p


def setup(args: argparse.Namespace) -> list[Backbone]:
    """The backbones (with their neighbour banks) of the parsed ``args``."""
    if not args.pretrained_weights:
        raise ViewerError("--pretrained_weights is required: the checkpoint whose maps to show")
    for path in [args.pretrained_weights] + ([args.compare] if args.compare else []):
        if not os.path.isfile(path):
            raise ViewerError(f"{path}: no such file")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = resolve_eval_precision(args, device)
    common = dict(
        checkpoint_key=args.checkpoint_key,
        device=device,
        dtype=dtype,
        precision=args.precision,
        normalize=args.normalize,
        image_size=args.image_size,
    )
    backbones = [
        load_backbone(
            args.pretrained_weights,
            tag="A",
            arch=args.arch,
            patch_size=args.patch_size,
            mode=args.mode,
            gamma=args.gamma,
            resample_native_pos=args.resample_native_pos,
            **common,
        )
    ]
    if args.compare:
        backbones.append(load_backbone(args.compare, tag="B", **common))
    return backbones


def seconds_since_start() -> float:
    """Seconds since this process started (its imports included), from /proc on Linux; else
    since the viewer's module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def run(args: argparse.Namespace) -> str:
    utils.setup_logging()
    for name in ("httpx", "gradio", "uvicorn"):  # request logs of the page's own startup checks
        logging.getLogger(name).setLevel(logging.WARNING)
    _gradio()  # missing Gradio: one line before any model is loaded
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: --host {args.host} serves the viewer to the network: anyone who can reach this machine on "
            f"port {args.port} can use it and upload files to it",
            file=sys.stderr,
            flush=True,
        )
    backbones = setup(args)
    features = 0.0
    if args.data_path != NO_DATA:
        t = time.perf_counter()
        for bb in backbones:
            bb.bank = build_bank(bb, args.data_path, args.subset, args.batch_size, args.num_workers)
        features = time.perf_counter() - t
    demo = build_app(backbones, args.data_path)
    url = serve(demo, args.host, args.port)
    print(
        f"SimPool viewer at {url} (ready {seconds_since_start():.1f} s after start, {features:.1f} s of it for "
        "the neighbours' features; Ctrl-C stops it)",
        flush=True,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None  # kill = Ctrl-C
    try:
        with contextlib.suppress(KeyboardInterrupt):
            demo.block_thread()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return url


def main(argv: Sequence[str] | None = None) -> str | None:
    args = get_args_parser().parse_args(argv)
    return utils.run_command(run, args)


if __name__ == "__main__":
    main()
