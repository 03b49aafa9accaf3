"""DINO multi-crop augmentation: 2 global + N local crops per image.

Split in two stages so that no crop makes a PIL round trip per photometric op:
  1. geometry (random resized crop + horizontal flip), either per image in the data
     loader's workers (``crop_image``, images of any size) or for a whole batch of
     equal-size images at once (``crop_batch``, via ``roi_align``);
  2. photometry on the crop batches, on the training device (``photometric``):
     colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 / 0.1 / 0.5 for
     global 1 / global 2 / locals), solarize (p=0.2 on global 2), normalisation
     (DINO's probabilities by default; each is a constructor argument).
Grayscale sources are expanded to 3 channels, so every model sees RGB.

Crops come back view-major: ``globals`` is (2B, 3, g, g) holding view 0 of every
image then view 1; ``locals`` is (nB, 3, l, l) in the same order.

Example:
    >>> aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=28, local_crops_size=12)
    >>> g, l = aug(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8))
    >>> g.shape, l.shape
    (torch.Size([16, 3, 28, 28]), torch.Size([16, 3, 12, 12]))
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
__all__ = ["MultiCropAugmentation", "IMAGENET_MEAN", "IMAGENET_STD"]


class MultiCropAugmentation:
    """Multi-crop augmentation with DINO's recipe; see the module docstring.

    Args:
        global_crops_scale / local_crops_scale: (min, max) area fraction of a crop.
        local_crops_number: local crops per image (0 disables them).
        global_crops_size / local_crops_size: output side in pixels.
        mean / std: per-channel normalisation (3 values).
        blur_sigma: (min, max) Gaussian blur sigma in output pixels.
        color_jitter_prob / grayscale_prob: per-crop probabilities (DINO: 0.8 / 0.2).
        blur_prob: blur probability for (global 1, global 2, locals) (DINO: 1.0, 0.1, 0.5).
        solarization_prob: solarize probability of global 2 (DINO: 0.2).
    """

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_crops_size=224, local_crops_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 blur_sigma=(0.1, 2.0), color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=(1.0, 0.1, 0.5),
                 solarization_prob=0.2):
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
        self._global_crop = v2.Compose([v2.RandomResizedCrop(global_crops_size, self.global_crops_scale,
                                                             interpolation=bicubic, antialias=True),
                                        v2.RandomHorizontalFlip()])
        self._local_crop = v2.Compose([v2.RandomResizedCrop(local_crops_size, self.local_crops_scale,
                                                            interpolation=bicubic, antialias=True),
                                       v2.RandomHorizontalFlip()])

    def set_normalization(self, mean, std):
        """Per-channel mean and std (3 values each) of the final normalisation."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def num_crops(self):
        return 2 + self.local_crops_number

    def __call__(self, batch):
        """Full pipeline: a uint8 batch (B, C, H, W) of equal-size images, or the
        (globals, locals) pair that ``collate`` built from ``crop_image`` outputs."""
        if torch.is_tensor(batch):
            batch = self.crop_batch(batch)
        return self.photometric(*batch)

    # ---- stage 1: geometry -------------------------------------------------------
    def crop_image(self, image):
        """Per-image geometry for the data loader: a PIL image or (C, H, W) uint8
        tensor -> list of ``num_crops`` uint8 tensors (3, h, w)."""
        if isinstance(image, Image.Image) and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # palette, CMYK, LA...: let PIL map them to colours
        image = _to_rgb(v2.functional.to_image(image))
        crops = [self._global_crop(image) for _ in range(2)]
        crops += [self._local_crop(image) for _ in range(self.local_crops_number)]
        return [c.as_subclass(torch.Tensor) for c in crops]

    @staticmethod
    def collate(samples):
        """Stack per-image crop lists (from ``crop_image``) into view-major (globals, locals)."""
        views = list(zip(*samples))  # views[v][b]
        globals_ = torch.stack([c for v in views[:2] for c in v])
        locals_ = torch.stack([c for v in views[2:] for c in v]) if len(views) > 2 else None
        return globals_, locals_

    def crop_batch(self, images):
        """Batched geometry for equal-size images (B, C, H, W), uint8 or float in [0, 1]:
        each crop is an independent random resized crop and flip, resampled with
        ``roi_align`` (bilinear, averaging several samples per output pixel when
        shrinking, which anti-aliases). Returns float (globals, locals) in [0, 1]."""
        images = _to_rgb(images)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        globals_ = self._crop_views(images, 2, self.global_crops_scale, self.global_crops_size)
        locals_ = None
        if self.local_crops_number:
            locals_ = self._crop_views(images, self.local_crops_number, self.local_crops_scale, self.local_crops_size)
        return globals_, locals_

    def _crop_views(self, images, n_views, scale, size):
        B, _, H, W = images.shape
        boxes = random_resized_crop_boxes(n_views * B, H, W, scale, device=images.device)
        index = torch.arange(B, device=images.device, dtype=images.dtype).repeat(n_views)
        crops = roi_align(images, torch.cat([index[:, None], boxes.to(images.dtype)], dim=1), size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flip = torch.rand(n_views * B, device=images.device) < 0.5
        return torch.where(flip[:, None, None, None], crops.flip(-1), crops)

    # ---- stage 2: photometry -----------------------------------------------------
    def photometric(self, globals_, locals_=None):
        """Colour jitter, grayscale, blur, solarize and normalise view-major crop
        batches (uint8 or float in [0, 1]) on their own device."""
        B = globals_.shape[0] // 2
        device = globals_.device
        blur_p = torch.cat([torch.full((B,), self.blur_prob[0]), torch.full((B,), self.blur_prob[1])]).to(device)
        solarize_p = torch.cat([torch.zeros(B), torch.full((B,), self.solarization_prob)]).to(device)
        out_g = self._photometric(globals_, blur_p, solarize_p)
        if locals_ is None:
            return out_g, None
        n = locals_.shape[0]
        out_l = self._photometric(locals_, torch.full((n,), self.blur_prob[2], device=device),
                                  torch.zeros(n, device=device))
        return out_g, out_l

    def _photometric(self, x, blur_p, solarize_p):
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        n = x.shape[0]
        x = color_jitter(x, torch.rand(n, device=x.device) < self.color_jitter_prob)
        x = torch.where((torch.rand(n, device=x.device) < self.grayscale_prob)[:, None, None, None],
                        _gray(x).expand_as(x), x)
        x = gaussian_blur(x, torch.rand(n, device=x.device) < blur_p, self.blur_sigma)
        x = torch.where((torch.rand(n, device=x.device) < solarize_p)[:, None, None, None] & (x >= 0.5), 1 - x, x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _to_rgb(images):
    if images.shape[-3] == 1:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if images.shape[-3] == 4:  # RGBA: drop alpha
        return images[..., :3, :, :]
    return images


def _gray(x):
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def random_resized_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device=None, attempts=10):
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


def color_jitter(x, apply, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """Per-sample colour jitter on float (n, 3, h, w) in [0, 1]; rows with
    ``apply`` False are returned unchanged. Hue is a rotation of the chroma
    plane in YIQ space by up to ``hue`` of a turn."""
    n = x.shape[0]

    def factor(strength):
        f = torch.empty(n, device=x.device).uniform_(1 - strength, 1 + strength)
        return torch.where(apply, f, 1.0).view(n, 1, 1, 1)

    x = (x * factor(brightness)).clamp_(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp_(0, 1)
    gray = _gray(x)
    x = ((x - gray) * factor(saturation) + gray).clamp_(0, 1)
    angle = torch.where(apply, torch.empty(n, device=x.device).uniform_(-hue, hue), 0.0) * 2 * math.pi
    return hue_rotate(x, angle).clamp_(0, 1)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def hue_rotate(x, angle):
    """Rotate the hue of float RGB (n, 3, h, w) by ``angle`` (n,) radians (YIQ rotation)."""
    n = x.shape[0]
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(n, 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    rgb2yiq = _RGB2YIQ.to(x.device)
    mat = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", mat, x)


def gaussian_blur(x, apply, sigma_range):
    """Separable Gaussian blur with a per-sample sigma ~ U(sigma_range) where
    ``apply`` is True; other rows pass unchanged. Borders are reflected."""
    n, c, h, w = x.shape
    radius = min(math.ceil(3 * sigma_range[1]), (min(h, w) - 1))
    if radius < 1:
        return x
    sigma = torch.empty(n, device=x.device).uniform_(*sigma_range)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (taps == 0).to(x.dtype).expand(n, -1)
    kernel = torch.where(apply[:, None], kernel, identity).repeat_interleave(c, 0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)
