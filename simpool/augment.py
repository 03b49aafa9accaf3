"""DINO multi-crop augmentation: 2 global (iBOT: any number) + N local crops per image.

Split in two stages so that no crop makes a PIL round trip per photometric op:
  1. geometry (random resized crop + horizontal flip), either per image in the data
     loader's workers (``crop_image``, images of any size) or for a whole batch of
     equal-size images at once (``crop_batch``, via ``roi_align``);
  2. photometry on the crop batches, on the training device (``photometric``):
     colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 / 0.1 / 0.5 for
     global 1 / global 2 / locals), solarize (p=0.2 on global 2), normalisation
     (DINO's probabilities by default; each is a constructor argument). With more than
     two global crops, every one after the first is treated as global 2, as in iBOT.
Grayscale sources are expanded to 3 channels, so every model sees RGB.

Crops come back view-major: ``globals`` is (2B, 3, g, g) holding view 0 of every
image then view 1 (and so on, with more global crops); ``locals`` is (nB, 3, l, l) in
the same order.

Example:
    >>> aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=28, local_crops_size=12)
    >>> g, l = aug(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8))
    >>> g.shape, l.shape
    (torch.Size([16, 3, 28, 28]), torch.Size([16, 3, 12, 12]))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import v2

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
__all__ = ["MultiCropAugmentation", "IMAGENET_MEAN", "IMAGENET_STD", "eight_bit"]


class MultiCropAugmentation:
    """Multi-crop augmentation with DINO's recipe; see the module docstring.

    Args:
        global_crops_scale / local_crops_scale: (min, max) area fraction of a crop.
        local_crops_number: local crops per image (0 disables them).
        global_crops_number: global crops per image (DINO: 2; iBOT's --global_crops_number).
        global_crops_size / local_crops_size: output side in pixels.
        mean / std: per-channel normalisation (3 values).
        blur_sigma: (min, max) Gaussian blur sigma in output pixels.
        color_jitter_prob / grayscale_prob: per-crop probabilities (DINO: 0.8 / 0.2).
        blur_prob: blur probability for (global 1, global 2 and later ones, locals) (DINO: 1.0, 0.1, 0.5).
        solarization_prob: solarize probability of global 2 and later ones (DINO: 0.2).
    """

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultiCropAugmentation:
        """The augmentation main_dino.py's flags describe."""
        return cls(
            args.global_crops_scale,
            args.local_crops_scale,
            args.local_crops_number,
            args.global_crops_size,
            args.local_crops_size,
            blur_sigma=args.blur_sigma,
            color_jitter_prob=args.color_jitter_prob,
            grayscale_prob=args.grayscale_prob,
            blur_prob=args.blur_prob,
            solarization_prob=args.solarization_prob,
            global_crops_number=args.global_crops_number,
        )

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: Sequence[float] = (1.0, 0.1, 0.5),
        solarization_prob: float = 0.2,
        global_crops_number: int = 2,
    ) -> None:
        if global_crops_number < 1:
            raise ValueError(f"global_crops_number must be at least 1, got {global_crops_number}")
        self.global_crops_number = global_crops_number
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.set_normalization(mean, std)
        self.blur_sigma = blur_sigma
        self.color_jitter_prob, self.grayscale_prob = color_jitter_prob, grayscale_prob
        self.blur_prob, self.solarization_prob = tuple(blur_prob), solarization_prob
        bicubic = v2.InterpolationMode.BICUBIC
        self._global_crop = v2.Compose(
            [
                v2.RandomResizedCrop(global_crops_size, self.global_crops_scale, interpolation=bicubic, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )
        self._local_crop = v2.Compose(
            [
                v2.RandomResizedCrop(local_crops_size, self.local_crops_scale, interpolation=bicubic, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel mean and std (3 values each) of the final normalisation."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def num_crops(self) -> int:
        return self.global_crops_number + self.local_crops_number

    def __call__(
        self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full pipeline: a uint8 batch (B, C, H, W) of equal-size images, or the
        (globals, locals) pair that ``collate`` built from ``crop_image`` outputs."""
        if torch.is_tensor(batch):
            batch = self.crop_batch(batch)
        return self.photometric(*batch)

    # ---- stage 1: geometry -------------------------------------------------------
    def crop_image(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        """Per-image geometry for the data loader: a PIL image or (C, H, W) uint8
        tensor -> list of ``num_crops`` uint8 tensors (3, h, w).

        A PIL image may still be undecoded (``Image.open`` without ``load``): the crop
        boxes are drawn from its header size first, and a JPEG is then decoded at the
        smallest DCT scale (1/2, 1/4, 1/8) that still leaves every crop at least its
        output size, so each crop is still a downscale of the pixels it covers. Each crop
        is one antialiased bicubic resize of its box (PIL's filter, in torch's vectorised
        uint8 resampler)."""
        if isinstance(image, Image.Image):
            return self._crop_pil(image)
        image = _to_rgb(v2.functional.to_image(image))
        crops = [self._global_crop(image) for _ in range(self.global_crops_number)]
        crops += [self._local_crop(image) for _ in range(self.local_crops_number)]
        return [c.as_subclass(torch.Tensor) for c in crops]

    crop_image.decodes = True  # SafeImageFolder hands it the opened, undecoded image

    def _crop_pil(self, image: Image.Image) -> list[torch.Tensor]:
        W, H = image.size
        n_local = self.local_crops_number
        n_global = self.global_crops_number
        boxes = random_resized_crop_boxes(n_global, H, W, self.global_crops_scale)
        sizes = [_pair(self.global_crops_size)] * n_global + [_pair(self.local_crops_size)] * n_local
        if n_local:
            boxes = torch.cat([boxes, random_resized_crop_boxes(n_local, H, W, self.local_crops_scale)])
        flips = (torch.rand(len(sizes)) < 0.5).tolist()
        if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            room = float((side / torch.tensor([max(hw) for hw in sizes], dtype=side.dtype)).min())  # shrink room
            factor = next((f for f in (8, 4, 2) if f <= room), 1)
            if factor > 1:
                drafted = image.draft(image.mode, (W // factor, H // factor))
                if drafted is not None:  # decoded at 1/scale: box coordinates scale with it
                    boxes = boxes * (drafted[1][2] / W)
        image = eight_bit(image)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # palette, CMYK, LA...: let PIL map them to colours
        pixels = torch.from_numpy(np.array(image))  # decodes; (H, W, 3) or (H, W)
        pixels = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)  # channels-last strides
        H, W = pixels.shape[-2:]
        crops = []
        for (x1, y1, x2, y2), size, flip in zip(boxes.round().long().tolist(), sizes, flips):
            x1, y1 = min(max(x1, 0), W - 1), min(max(y1, 0), H - 1)
            x2, y2 = min(max(x2, x1 + 1), W), min(max(y2, y1 + 1), H)
            # uint8 channels-last bicubic with antialiasing: torch's vectorised resampler (PIL's filter)
            crop = F.interpolate(pixels[None, :, y1:y2, x1:x2], size=size, mode="bicubic", antialias=True)[0]
            crops.append(crop.flip(-1) if flip else crop)
        return [c.expand(3, -1, -1) if c.shape[0] == 1 else c for c in crops]

    def collate(self, samples: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stack per-image crop lists (from ``crop_image``) into view-major (globals, locals)."""
        views = list(zip(*samples))  # views[v][b]
        n_global = self.global_crops_number
        globals_ = torch.stack([c for v in views[:n_global] for c in v])
        locals_ = torch.stack([c for v in views[n_global:] for c in v]) if len(views) > n_global else None
        return globals_, locals_

    def crop_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batched geometry for equal-size images (B, C, H, W), uint8 or float in [0, 1]:
        each crop is an independent random resized crop and flip, resampled with
        ``roi_align`` (bilinear, averaging several samples per output pixel when
        shrinking, which anti-aliases). Returns float (globals, locals) in [0, 1]."""
        images = _to_rgb(images)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        globals_ = self._crop_views(images, self.global_crops_number, self.global_crops_scale, self.global_crops_size)
        locals_ = None
        if self.local_crops_number:
            locals_ = self._crop_views(images, self.local_crops_number, self.local_crops_scale, self.local_crops_size)
        return globals_, locals_

    def _crop_views(
        self, images: torch.Tensor, n_views: int, scale: Sequence[float], size: int | tuple[int, int]
    ) -> torch.Tensor:
        B, _, H, W = images.shape
        boxes = random_resized_crop_boxes(n_views * B, H, W, scale, device=images.device)
        index = torch.arange(B, device=images.device, dtype=images.dtype).repeat(n_views)
        crops = roi_align(
            images,
            torch.cat([index[:, None], boxes.to(images.dtype)], dim=1),
            size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
        flip = torch.rand(n_views * B, device=images.device) < 0.5
        return torch.where(flip[:, None, None, None], crops.flip(-1), crops)

    # ---- stage 2: photometry -----------------------------------------------------
    def photometric(
        self, globals_: torch.Tensor, locals_: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Colour jitter, grayscale, blur, solarize and normalise view-major crop
        batches (uint8 or float in [0, 1]) on their own device."""
        B = globals_.shape[0] // self.global_crops_number
        later = globals_.shape[0] - B  # the rows of global crops 2, 3, ...
        device = globals_.device
        blur_p = torch.cat([torch.full((B,), self.blur_prob[0]), torch.full((later,), self.blur_prob[1])]).to(device)
        solarize_p = torch.cat([torch.zeros(B), torch.full((later,), self.solarization_prob)]).to(device)
        out_g = self._photometric(globals_, blur_p, solarize_p)
        if locals_ is None:
            return out_g, None
        n = locals_.shape[0]
        out_l = self._photometric(
            locals_, torch.full((n,), self.blur_prob[2], device=device), torch.zeros(n, device=device)
        )
        return out_g, out_l

    def _photometric(self, x: torch.Tensor, blur_p: torch.Tensor, solarize_p: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        device = x.device
        # every random draw for the whole batch first, so chunking below changes no result
        jitter = torch.rand(n, device=device) < self.color_jitter_prob
        factors = jitter_factors(jitter)
        order = jitter_order(n, device)
        gray = torch.rand(n, device=device) < self.grayscale_prob
        blur = torch.rand(n, device=device) < blur_p
        sigma = torch.empty(n, device=device).uniform_(*self.blur_sigma)
        solarize = torch.rand(n, device=device) < solarize_p
        dtype = torch.float32 if x.dtype == torch.uint8 else torch.promote_types(x.dtype, torch.float32)
        scale = (1 / self.std).to(device, dtype)
        shift = (-self.mean / self.std).to(device, dtype)
        out = torch.empty(x.shape, dtype=dtype, device=device)
        # On the CPU the ops run on chunks that stay in cache (one global crop, or ~9 locals),
        # with the rarely-applied ops on their rows only; elsewhere, on the whole batch.
        step = max(1, _CHUNK // x[0].numel()) if device.type == "cpu" else n
        for i in range(0, n, step):
            rows = slice(i, i + step)
            y = x[rows] if x.dtype != torch.uint8 else x[rows] * (1 / 255)  # one pass, to float32
            y = _on_rows(y, jitter[rows], _jitter, factors[rows], order[rows])
            y = _on_rows(y, gray[rows], lambda t: _gray(t).expand_as(t))
            y = _on_rows(y, blur[rows], lambda t, sg: _blur(t, sg, _sigma_bound(sg, self.blur_sigma[1])), sigma[rows])
            y = _on_rows(y, solarize[rows], lambda t: torch.where(t >= 0.5, 1 - t, t))
            out[rows].copy_(y).mul_(scale).add_(shift)  # (y - mean) / std; faster than one addcmul
        return out


# Elements per chunk on the CPU: a 224x224 RGB crop (600 KB of float32) stays in the L2 cache.
_CHUNK = 3 * 224 * 224


def _on_rows(
    x: torch.Tensor, mask: torch.Tensor, fn: Callable[..., torch.Tensor], *params: torch.Tensor
) -> torch.Tensor:
    """``fn(rows, *row_params)`` on the rows of ``x`` where ``mask`` holds (``params`` are
    per-row tensors); ``fn`` returns a new tensor. On the CPU only the selected rows are
    computed; elsewhere (no host syncs) every row is, and ``where`` keeps the others."""
    if x.device.type != "cpu":
        return torch.where(mask.view(-1, 1, 1, 1), fn(x, *params), x)
    n_sel = int(mask.sum())
    if n_sel == 0:
        return x
    if n_sel == len(mask):
        return fn(x, *params)
    out = x.clone()
    out[mask] = fn(x[mask], *(p[mask] for p in params))
    return out


def _pair(size: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-3] == 1:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if images.shape[-3] == 4:  # RGBA: drop alpha
        return images[..., :3, :, :]
    return images


def eight_bit(image: Image.Image) -> Image.Image:
    """A PIL image with 8-bit channels: 16-bit integer images ("I;16" modes, and "I", which
    holds 16-bit PNGs in older Pillows) are mapped from 0..65535 and float images ("F") from
    0..1, both clipped, to "L"; other modes come back as they are. (PIL's own conversion to
    "RGB" or "L" clips such values at 255: a 16-bit image turns nearly white, a float one black.)

    Example:
        >>> np.asarray(eight_bit(Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)))).tolist()
        [[0, 1, 255]]
    """
    if image.mode == "F":
        scale = 255.0
    elif image.mode == "I" or image.mode.startswith("I;16"):
        scale = 255.0 / 65535
    else:
        return image
    values = np.asarray(image, dtype=np.float32) * scale
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (n, 1, h, w) of float RGB (n, 3, h, w)."""
    y = x[:, 0] * _LUMA[0]
    y.add_(x[:, 1], alpha=_LUMA[1]).add_(x[:, 2], alpha=_LUMA[2])
    return y.unsqueeze(1)


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """``n`` boxes (x1, y1, x2, y2) sampled as torchvision's RandomResizedCrop does:
    the first of ``attempts`` (area, log-aspect) draws that fits, else a centre crop
    with the aspect ratio clamped to ``ratio``."""
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(*scale)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    top = (torch.rand(n) * (height - h + 1)).floor()
    left = (torch.rand(n) * (width - w + 1)).floor()
    # Fallback: centre crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    bad = first < 0
    w = torch.where(bad, float(fw), w)
    h = torch.where(bad, float(fh), h)
    top = torch.where(bad, float((height - fh) // 2), top)
    left = torch.where(bad, float((width - fw) // 2), left)
    return torch.stack([left, top, left + w, top + h], dim=1).to(device)


def jitter_factors(
    apply: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1
) -> torch.Tensor:
    """(n, 4) colour-jitter draws: brightness, contrast and saturation factors and the hue
    shift in turns; rows with ``apply`` False get the identity (1, 1, 1, 0)."""
    n, device = apply.shape[0], apply.device
    draws = [torch.empty(n, device=device).uniform_(1 - s, 1 + s) for s in (brightness, contrast, saturation)]
    draws.append(torch.empty(n, device=device).uniform_(-hue, hue))
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    return torch.where(apply[:, None], torch.stack(draws, 1), identity)


def jitter_order(
    n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 4) per-row orders of the four jitter ops (0 brightness, 1 contrast, 2 saturation,
    3 hue), each a uniform random permutation."""
    return torch.rand(n, 4, device=device, generator=generator).argsort(dim=1)


def _brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x * b.view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (x - mean) * c + mean, around the image's mean luma
    c = c.view(-1, 1, 1, 1)
    mean = (x.mean(dim=(2, 3)) @ torch.tensor(_LUMA, dtype=x.dtype, device=x.device)).view(-1, 1, 1, 1)
    return (x * c).add_(mean * (1 - c)).clamp_(0, 1)


def _saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # towards each pixel's luma
    return torch.lerp(_gray(x).expand_as(x), x, s.view(-1, 1, 1, 1)).clamp_(0, 1)


def _jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Colour jitter with the (n, 4) ``factors`` of ``jitter_factors``, each row applying the
    ops in its ``order`` (``jitter_order``; None: brightness, contrast, saturation, hue);
    returns a new tensor. On the CPU the rows sharing an order run together; elsewhere (no
    host syncs) each step runs every op on every row and keeps the row's own."""
    factors = factors.to(x.dtype)
    if order is None:
        order = torch.arange(4, device=x.device).expand(x.shape[0], 4)
    if x.device.type != "cpu":
        return _jitter_all_rows(x, factors, order)
    groups = {}
    for i, o in enumerate(order.tolist()):
        groups.setdefault(tuple(o), []).append(i)
    out = None if len(groups) == 1 else torch.empty_like(x)
    for ops, rows in groups.items():
        # one row (the common case in small chunks): views, no gather
        index = slice(rows[0], rows[0] + 1) if len(rows) == 1 else torch.tensor(rows, device=x.device)
        y, f = (x, factors) if out is None else (x[index], factors[index])
        for k in ops:
            y = _JITTER_OPS[k](y, f[:, k])
        if out is None:
            return y
        out[index] = y
    return out


def _jitter_all_rows(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    for step in range(4):
        out = x
        for k, op in enumerate(_JITTER_OPS):
            out = torch.where((order[:, step] == k).view(-1, 1, 1, 1), op(x, factors[:, k]), out)
        x = out
    return x


# Where each channel is the max on the hue circle, in sextants from red.
_CHANNEL_HUES = (0.0, 2.0, -2.0)


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the hue of float RGB (n, 3, h, w) in [0, 1] by ``shift`` (n,) turns in HSV space,
    keeping saturation and value, as torchvision's ``adjust_hue`` does (to ~1e-6).

    Written without masks (``where`` on booleans is the slow op here): with M, m the max and
    min of a pixel and c = M - m, its hue in sextants from red is +-(d + a (3 - 2d)), signed
    as g - b, where d = |g - b| / c and a = (M - r) / c (one of a = 0, d = 1, a = 1 holds:
    red is the max, the middle or the min). Each channel comes back as
    m + c * clamp(2 - circular distance of the hue from that channel's, 0, 1), with the
    channels' hues moved by -shift instead of every pixel's by +shift.

    Example:
        >>> hue_shift(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1), torch.tensor([1 / 3])).flatten()
        tensor([0., 1., 0.])
    """
    r, g, b = x.unbind(1)
    hi = torch.maximum(r, g)
    hi = torch.maximum(hi, b, out=hi)
    lo = torch.minimum(r, g)
    lo = torch.minimum(lo, b, out=lo)
    chroma = hi - lo
    # grey pixels (chroma 0): d = a = 0, and the result is lo whatever the hue
    inv = chroma.clamp_min(torch.finfo(x.dtype).tiny).reciprocal_()
    g_minus_b = g - b
    d = g_minus_b.abs().mul_(inv)
    a = (hi - r).mul_(inv)
    hue = torch.addcmul(d, a, d.mul(-2).add_(3)).copysign_(g_minus_b)  # in [-3, 3]
    centres = torch.tensor(_CHANNEL_HUES, dtype=x.dtype, device=x.device) - 6 * shift.to(x.dtype)[:, None]
    centres = torch.remainder(centres + 3, 6).sub_(3).view(-1, 3, 1, 1)  # in [-3, 3)
    dist = (hue.unsqueeze(1) - centres).abs_()  # in [0, 6]: the circular distance is 3 - |dist - 3|
    weight = dist.sub_(3).abs_().sub_(1).clamp_(0, 1)
    return torch.addcmul(lo.unsqueeze(1), weight, chroma.unsqueeze(1))


_JITTER_OPS = (_brightness, _contrast, _saturation, hue_shift)


def _sigma_bound(sigma: torch.Tensor, max_sigma: float) -> float:
    """The largest sigma that ``_blur``'s tap loop must cover: the largest present on the CPU,
    the range's end elsewhere (no host sync); the result is the same either way."""
    return float(sigma.max()) if sigma.device.type == "cpu" else max_sigma


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each sample of float (n, c, h, w) with its own ``sigma`` (n,), its kernel truncated
    at ceil(3 sigma) taps (at most the image side - 1); ``max_sigma`` bounds the sigmas, and
    taps past a sample's own truncation weigh 0. A sum of shifted copies per direction (cheaper
    on the CPU than a grouped convolution with per-sample kernels)."""
    n, c, h, w = x.shape
    radius = min(math.ceil(3 * max_sigma), min(h, w) - 1)
    if radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.dtype)[:, None]
    kernel = torch.exp(-0.5 * (taps[None] / sigma) ** 2) * (taps.abs() <= torch.ceil(3 * sigma))
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 1, 2 * radius + 1)
    k = [kernel[..., t : t + 1] for t in range(2 * radius + 1)]
    p = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = p[..., :w] * k[0]
    for t in range(1, 2 * radius + 1):
        y.addcmul_(p[..., t : t + w], k[t])
    p = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = p[..., :h, :] * k[0]
    for t in range(1, 2 * radius + 1):
        y.addcmul_(p[..., t : t + h, :], k[t])
    return y
