"""Tests for simpool/augment.py: multi-crop geometry, photometric ops and their reference formulas."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from simpool.augment import (
    MultiCropAugmentation,
    _blur,
    _jitter,
    _jitter_all_rows,
    _sigma_bound,
    hue_shift,
    jitter_factors,
    jitter_order,
    random_resized_crop_boxes,
)

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)
LUMA = np.array([0.299, 0.587, 0.114])


def color_jitter(x, apply, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """The photometric stage's jitter on its own: factors per row, each row's own random order."""
    return _jitter(x, jitter_factors(apply, brightness, contrast, saturation, hue), jitter_order(x.shape[0], x.device))


def gaussian_blur(x, apply, sigma_range):
    """The photometric stage's blur on its own: a per-row sigma ~ U(sigma_range) where ``apply``."""
    sigma = torch.empty(x.shape[0], device=x.device).uniform_(*sigma_range)
    return torch.where(apply.view(-1, 1, 1, 1), _blur(x, sigma, _sigma_bound(sigma, sigma_range[1])), x)


def _aug(**kw):
    args = dict(local_crops_number=3, global_crops_size=16, local_crops_size=8, mean=MEAN, std=STD)
    args.update(kw)
    return MultiCropAugmentation(**args)


def _constant_batch(values, channels, size=(20, 24)):
    """uint8 batch where image b is constant at values[b] (per channel if a tuple)."""
    out = torch.empty(len(values), channels, *size, dtype=torch.uint8)
    for b, v in enumerate(values):
        out[b] = torch.tensor(v, dtype=torch.uint8).view(-1, 1, 1).expand(channels, *size)
    return out


# ---------------------------------------------------------------- full pipeline, batched geometry
@pytest.mark.parametrize("channels", [1, 3])
def test_pipeline_shapes_and_dtypes(channels):
    torch.manual_seed(0)
    aug = _aug()
    batch = torch.randint(0, 256, (4, channels, 20, 24), dtype=torch.uint8)
    g, l = aug(batch)
    assert aug.num_crops == 5
    assert g.shape == (8, 3, 16, 16) and g.dtype == torch.float32
    assert l.shape == (12, 3, 8, 8) and l.dtype == torch.float32
    assert torch.isfinite(g).all() and torch.isfinite(l).all()
    # normalised values of [0, 1] pixels stay within [(0-mean)/std, (1-mean)/std]
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for x in (g, l):
        assert (x >= lo.view(1, 3, 1, 1) - 1e-4).all() and (x <= hi.view(1, 3, 1, 1) + 1e-4).all()


def test_pipeline_without_locals():
    g, l = _aug(local_crops_number=0)(torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8))
    assert g.shape == (4, 3, 16, 16) and l is None


def test_more_global_crops_take_the_second_crops_recipe():
    """iBOT's --global_crops_number 3: three global views per image, view-major; views 2 and 3
    draw global crop 2's blur and solarization, view 1 its own."""
    torch.manual_seed(2)
    batch = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    aug = _aug(global_crops_number=3)
    assert aug.num_crops == 6
    crops = [aug.crop_image(image) for image in batch]
    assert len(crops[0]) == 6 and [c.shape[-1] for c in crops[0]] == [16, 16, 16, 8, 8, 8]
    g, l = aug.collate(crops)
    assert g.shape == (12, 3, 16, 16) and l.shape == (12, 3, 8, 8)
    assert torch.equal(g[4 + 1], crops[1][1]) and torch.equal(l[4 * 2 + 3], crops[3][5])  # view-major
    assert aug.crop_batch(batch)[0].shape == (12, 3, 16, 16)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    plain = (g / 255 - mean) / std
    solarized = (torch.where(g / 255 >= 0.5, 1 - g / 255, g / 255) - mean) / std
    off = dict(global_crops_number=3, color_jitter_prob=0.0, grayscale_prob=0.0)
    out, _ = _aug(blur_prob=(0.0, 0.0, 0.0), solarization_prob=1.0, **off).photometric(g, l)
    torch.testing.assert_close(out[:4], plain[:4])
    torch.testing.assert_close(out[4:], solarized[4:])
    out, _ = _aug(blur_prob=(1.0, 0.0, 0.0), solarization_prob=0.0, **off).photometric(g, l)
    assert all(not torch.allclose(out[i], plain[i]) for i in range(4))
    torch.testing.assert_close(out[4:], plain[4:])
    with pytest.raises(ValueError, match="global_crops_number must be at least 1, got 0"):
        _aug(global_crops_number=0)


def test_pipeline_is_crop_batch_then_photometric():
    aug = _aug()
    batch = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    torch.manual_seed(1)
    g, l = aug(batch)
    torch.manual_seed(1)
    g2, l2 = aug.photometric(*aug.crop_batch(batch))
    assert torch.equal(g, g2) and torch.equal(l, l2)


@pytest.mark.parametrize("channels", [1, 3])
def test_black_images_normalise_to_minus_mean_over_std(channels):
    # Every photometric op maps black to black (brightness scales, contrast/saturation pivot
    # on the zero mean, hue keeps a pixel's max and min, grayscale is linear, blur averages, 0 < 0.5 is not solarized),
    # so the output is exactly the normalised zero whatever the random draws.
    torch.manual_seed(2)
    g, l = _aug()(torch.zeros(3, channels, 20, 24, dtype=torch.uint8))
    expected = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    torch.testing.assert_close(g, expected.expand_as(g), rtol=0, atol=1e-6)
    torch.testing.assert_close(l, expected.expand_as(l), rtol=0, atol=1e-6)


def test_photometric_uint8_equals_float_div_255():
    aug = _aug()
    g = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    l = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(3)
    a = aug.photometric(g, l)
    torch.manual_seed(3)
    b = aug.photometric(g.float() / 255, l.float() / 255)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_batch_is_view_major(channels):
    torch.manual_seed(4)
    values = [(10, 60, 110), (200, 150, 100), (30, 240, 5)] if channels == 3 else [(10,), (120,), (250,)]
    aug = _aug()
    g, l = aug.crop_batch(_constant_batch(values, channels))
    B = len(values)
    assert g.shape == (2 * B, 3, 16, 16) and l.shape == (3 * B, 3, 8, 8)
    for crops, n_views in ((g, 2), (l, 3)):
        assert crops.dtype == torch.float32
        for v in range(n_views):
            for b in range(B):
                colour = torch.tensor(values[b], dtype=torch.float32).expand(3) / 255  # gray -> 3 equal channels
                torch.testing.assert_close(
                    crops[v * B + b], colour.view(3, 1, 1).expand(3, *crops.shape[-2:]), rtol=0, atol=1e-5
                )


def test_crop_batch_drops_alpha():
    torch.manual_seed(5)
    batch = _constant_batch([(10, 20, 30, 255)], 4)
    g, _ = _aug(local_crops_number=0).crop_batch(batch)
    torch.testing.assert_close(g[0, :, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


@pytest.mark.parametrize("size", [(16, 16), (10, 10)])
def test_crop_batch_full_scale_reproduces_image(size):
    # scale (1, 1) on a square image (aspect 1 inside (3/4, 4/3)): the only box whose rounded
    # sides fit is the whole image (else the fallback centre crop is the whole image too),
    # and at the image's own size roi_align(aligned=True) samples the pixel centres exactly.
    torch.manual_seed(6)
    H, W = size
    images = torch.rand(3, 3, H, W)
    aug = MultiCropAugmentation(
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        local_crops_number=2,
        global_crops_size=(H, W),
        local_crops_size=(H, W),
    )
    g, l = aug.crop_batch(images)
    flips = 0
    for crops, n_views in ((g, 2), (l, 2)):
        for v in range(n_views):
            for b in range(3):
                crop = crops[v * 3 + b]
                if torch.allclose(crop, images[b], atol=1e-5):
                    continue
                torch.testing.assert_close(crop, images[b].flip(-1), rtol=0, atol=1e-5)
                flips += 1
    assert 0 < flips < 12  # flips happen, and not always


# ---------------------------------------------------------------- boxes
def test_boxes_within_bounds_and_scale():
    torch.manual_seed(7)
    H, W = 120, 100
    scale, ratio = (0.2, 0.5), (3 / 4, 4 / 3)
    boxes = random_resized_crop_boxes(500, H, W, scale, ratio)
    assert boxes.shape == (500, 4)
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
    w, h = x2 - x1, y2 - y1
    assert (w > 0).all() and (h > 0).all()
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes
    frac = w * h / (H * W)
    # w and h are rounded to whole pixels: allow that slack on the area and the aspect
    assert frac.min() >= scale[0] - 0.02 and frac.max() <= scale[1] + 0.02
    aspect = w / h
    assert aspect.min() >= ratio[0] - 0.05 and aspect.max() <= ratio[1] + 0.05
    # the draws cover the range and positions vary
    assert frac.min() < 0.25 and frac.max() > 0.45
    assert len(set(x1.tolist())) > 10 and len(set(y1.tolist())) > 10


def test_boxes_full_scale_exact_ratio_is_whole_image():
    torch.manual_seed(20)
    boxes = random_resized_crop_boxes(20, 12, 16, (1.0, 1.0), (4 / 3, 4 / 3))
    torch.testing.assert_close(boxes.float(), torch.tensor([[0.0, 0.0, 16.0, 12.0]]).expand(20, 4))


def test_boxes_fallback_is_centre_crop_with_clamped_ratio():
    torch.manual_seed(8)
    # A 50x100 (h x w) image cannot hold a full-area crop of aspect <= 4/3: centre crop 67x50.
    boxes = random_resized_crop_boxes(5, 50, 100, (1.0, 1.0), (3 / 4, 4 / 3))
    expected = torch.tensor([[16.0, 0.0, 83.0, 50.0]]).expand(5, 4)
    torch.testing.assert_close(boxes.float(), expected)


# ---------------------------------------------------------------- per-image geometry + collate
def _pil(colour, mode, size=(30, 22)):
    return Image.new(mode, size, colour)


@pytest.mark.parametrize("mode,colours", [("RGB", [(250, 10, 90), (5, 128, 200)]), ("L", [40, 220])])
def test_crop_image_and_collate(mode, colours):
    torch.manual_seed(9)
    aug = _aug(local_crops_number=2)
    samples = [aug.crop_image(_pil(c, mode)) for c in colours]
    for crops in samples:
        assert len(crops) == 4
        assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
        assert all(type(c) is torch.Tensor and c.dtype == torch.uint8 for c in crops)
    g, l = aug.collate(samples)
    B = len(colours)
    assert g.shape == (2 * B, 3, 16, 16) and l.shape == (2 * B, 3, 8, 8)
    for crops, n_views in ((g, 2), (l, 2)):
        for v in range(n_views):
            for b, c in enumerate(colours):
                c = torch.tensor(c if mode == "RGB" else (c, c, c), dtype=torch.int16)
                diff = (crops[v * B + b].to(torch.int16) - c.view(3, 1, 1)).abs()
                assert diff.max() <= 1
    out_g, out_l = aug((g, l))
    assert out_g.shape == (2 * B, 3, 16, 16) and out_g.dtype == torch.float32
    assert out_l.shape == (2 * B, 3, 8, 8) and out_l.dtype == torch.float32


def test_crop_image_accepts_uint8_tensor_and_collate_without_locals():
    torch.manual_seed(10)
    aug = _aug(local_crops_number=0)
    img = torch.randint(0, 256, (1, 25, 31), dtype=torch.uint8)
    crops = aug.crop_image(img)
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2
    assert torch.equal(crops[0][0], crops[0][1])  # gray expanded to identical channels
    g, l = aug.collate([crops, aug.crop_image(img)])
    assert g.shape == (4, 3, 16, 16) and l is None


@pytest.mark.parametrize(
    "mode,colour", [("P", 5), ("LA", (100, 255)), ("CMYK", (0, 255, 255, 0)), ("RGBA", (255, 0, 0, 128))]
)
def test_crop_image_other_pil_modes_give_their_rgb_colours(mode, colour):
    # crop_image takes "a PIL image": palette, gray+alpha and CMYK images must come out as
    # their RGB rendering (what Image.convert("RGB") shows), 3 channels.
    torch.manual_seed(21)
    image = Image.new(mode, (12, 10), colour)
    rgb = torch.tensor(image.convert("RGB").getpixel((0, 0)), dtype=torch.int16)
    crops = _aug(local_crops_number=1).crop_image(image)
    for c in crops:
        assert c.shape[0] == 3
        assert (c.to(torch.int16) - rgb.view(3, 1, 1)).abs().max() <= 1


@pytest.mark.parametrize(
    "suffix,values,grey",
    [
        (".png", np.full((10, 12), 32896, np.uint16), 128),  # 16-bit PNG: 32896 / 257
        (".tiff", np.full((10, 12), 0.25, np.float32), 64),  # float TIFF in [0, 1]
        (".tiff", np.full((10, 12), 3.5, np.float32), 255),
    ],
)  # clipped
def test_crop_image_and_loaders_scale_16_bit_and_float_images(tmp_path, suffix, values, grey):
    # PIL's own convert("RGB") clips these at 255: a mid-grey 16-bit image came out white, a float one black
    from simpool.attention import _open_image
    from simpool.data import SafeImageFolder

    (tmp_path / "train" / "a").mkdir(parents=True)
    path = tmp_path / "train" / "a" / f"x{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    for crop in _aug(local_crops_number=1).crop_image(Image.open(path)):
        assert crop.shape[0] == 3 and (crop.to(torch.int16) - grey).abs().max() <= 1
    image, _ = SafeImageFolder(str(tmp_path / "train"))[0]
    for rgb in (image, _open_image(str(path), "RGB")):
        assert rgb.mode == "RGB" and (np.asarray(rgb) == grey).all()


def _jpeg(path, size, colour=None):
    if colour is None:  # a smooth horizontal gradient
        ramp = np.linspace(0, 255, size[0]).astype(np.uint8)
        arr = np.stack([np.tile(ramp, (size[1], 1))] * 3, axis=-1)
        Image.fromarray(arr).save(path, quality=95)
    else:
        Image.new("RGB", size, colour).save(path, quality=95)
    return path


def test_crop_image_decodes_large_jpegs_at_a_reduced_scale(tmp_path):
    # every crop of a 1024x768 image at scale >= 0.4 is >= ~480 px a side, 16 px out: the
    # JPEG may be decoded at 1/8 (128x96) and each crop is still a downscale
    torch.manual_seed(22)
    aug = _aug(local_crops_number=2, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.4, 1.0))
    image = Image.open(_jpeg(tmp_path / "c.jpg", (1024, 768), (200, 40, 90)))
    crops = aug.crop_image(image)
    assert image.size == (128, 96)  # drafted before decoding
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    for c in crops:
        assert c.dtype == torch.uint8
        assert (c.to(torch.int16) - torch.tensor([200, 40, 90]).view(3, 1, 1)).abs().max() <= 3
    # 224-px global crops of a 640x480 image (sides ~300-480 px) need every pixel: no reduction
    small = Image.open(_jpeg(tmp_path / "g.jpg", (640, 480)))
    _aug(global_crops_size=224, local_crops_size=96).crop_image(small)
    assert small.size == (640, 480)


def test_crop_image_reduced_decoding_matches_full_decoding(tmp_path):
    # the same boxes from a 1/4-scale decode and from the full image agree (a gradient image)
    path = _jpeg(tmp_path / "g.jpg", (800, 600))
    aug = _aug(local_crops_number=1, global_crops_scale=(0.9, 1.0), local_crops_scale=(0.9, 1.0))
    torch.manual_seed(23)
    drafted = aug.crop_image(Image.open(path))
    torch.manual_seed(23)
    full_image = Image.open(path)
    full_image.load()  # decoded already: no draft possible
    full = aug.crop_image(full_image)
    for a, b in zip(drafted, full):
        assert (a.float() - b.float()).abs().mean() < 2.0


def test_safe_image_folder_with_crop_image_skips_truncated_jpegs(tmp_path):
    from simpool.data import SafeImageFolder

    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    _jpeg(root / "a" / "good.jpg", (300, 200), (10, 200, 30))
    data = (root / "a" / "good.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    aug = _aug(local_crops_number=1)
    ds = SafeImageFolder(str(root), transform=aug.crop_image)
    good, bad = (ds[0], ds[1]) if ds.samples[0][0].endswith("good.jpg") else (ds[1], ds[0])
    assert isinstance(bad, str) and bad.endswith("truncated.jpg")
    crops, label = good
    assert label == 0 and [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)]


# ---------------------------------------------------------------- gaussian blur
def _reference_blur(x, sigma, radius):
    """Direct 2-D convolution with a normalised (2r+1)^2 Gaussian, reflect padding, float64."""
    x = x.double().numpy()
    n, c, h, w = x.shape
    taps = np.arange(-radius, radius + 1)
    k2 = np.exp(-(taps[:, None] ** 2 + taps[None, :] ** 2) / (2 * sigma**2))
    k2 /= k2.sum()
    out = np.zeros_like(x)
    for i in range(n):
        for j in range(c):
            p = np.pad(x[i, j], radius, mode="reflect")
            for dy in range(2 * radius + 1):
                for dx in range(2 * radius + 1):
                    out[i, j] += k2[dy, dx] * p[dy : dy + h, dx : dx + w]
    return torch.from_numpy(out)


def test_blur_apply_false_is_identity():
    torch.manual_seed(11)
    x = torch.rand(3, 3, 10, 12)
    y = gaussian_blur(x, torch.zeros(3, dtype=torch.bool), (0.1, 2.0))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-7)


def test_blur_preserves_constant_image():
    x = torch.full((2, 3, 9, 11), 0.37)
    y = gaussian_blur(x, torch.ones(2, dtype=torch.bool), (1.0, 2.0))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma,size", [(1.5, (12, 14)), (0.75, (9, 9)), (2.0, (5, 6))])
def test_blur_matches_float64_reference(sigma, size):
    torch.manual_seed(12)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    y = gaussian_blur(x, torch.ones(2, dtype=torch.bool), (sigma, sigma))
    radius = min(math.ceil(3 * sigma), min(size) - 1)
    torch.testing.assert_close(y, _reference_blur(x, sigma, radius), rtol=0, atol=1e-10)
    assert (y - x).abs().max() > 1e-2  # it did blur


def test_blur_random_sigma_per_sample_and_apply_mask():
    # each applied row has its own sigma and its own truncation, ceil(3 sigma) taps
    x = torch.rand(3, 2, 11, 11, dtype=torch.float64)
    apply = torch.tensor([True, False, True])
    torch.manual_seed(13)
    y = gaussian_blur(x, apply, (0.3, 1.5))
    torch.manual_seed(13)
    sigmas = torch.empty(3).uniform_(0.3, 1.5)  # the first draw inside gaussian_blur
    radii = [math.ceil(3 * sigmas[i].item()) for i in (0, 2)]
    assert radii[0] != radii[1], radii
    torch.testing.assert_close(y[1], x[1], rtol=0, atol=1e-12)
    for i, radius in zip((0, 2), radii):
        ref = _reference_blur(x[i : i + 1], sigmas[i].item(), radius)[0]
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-10)


def test_blur_tap_loop_bound_changes_nothing():
    # off the CPU the tap loop runs to the sigma range's end (no host sync); taps past a row's own
    # truncation weigh 0, so the result equals the CPU's loop to the largest sigma present
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.7, 1.0, 1.3])
    tight = _blur(x, sigma, float(sigma.max()))
    torch.testing.assert_close(_blur(x, sigma, 2.0), tight, rtol=0, atol=1e-15)
    assert (tight - x).abs().amax(dim=(1, 2, 3)).min() > 0 and (tight[2:] - x[2:]).abs().max() > 1e-2


# ---------------------------------------------------------------- hue / colour jitter
def _colorsys_hue(x, shift):
    """Hue shift of float64 (n, 3, h, w) by ``shift`` (n,) turns, pixel by pixel with the standard
    library's HSV conversion."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for r in range(x.shape[2]):
            for c in range(x.shape[3]):
                h, sat, v = colorsys.rgb_to_hsv(*x[i, :, r, c])
                out[i, :, r, c] = colorsys.hsv_to_rgb((h + shift[i]) % 1.0, sat, v)
    return out


def _hue_inputs(n, dtype=torch.float64):
    """Random pixels with every kind of tie: grey, two channels equal at the max or the min,
    8-bit values, and pure primaries."""
    g = torch.Generator().manual_seed(13)
    x = torch.rand(n, 3, 6, 7, generator=g, dtype=dtype)
    x[:, :, 0] = x[:, :1, 0]  # grey
    x[:, 1, 1] = x[:, 0, 1]  # r == g
    x[:, 2, 2] = x[:, 1, 2]  # g == b
    x[:, 2, 3] = x[:, 0, 3]  # r == b
    x[:, :, 4] = (x[:, :, 4] * 255).round() / 255
    x[:, :, 5, :3] = torch.eye(3, dtype=dtype)
    return x


def test_hue_shift_matches_colorsys_in_float64():
    # HSV hue shift, wrapping around the circle, for shifts of any size (and of both signs)
    x = _hue_inputs(12)
    shift = torch.tensor([0.0, 0.1, -0.1, 0.05, 1 / 6, -1 / 3, 0.5, -0.5, 0.49, 0.75, -1.0, 2.3], dtype=torch.float64)
    y = hue_shift(x, shift)
    torch.testing.assert_close(y, torch.from_numpy(_colorsys_hue(x.numpy(), shift.tolist())), rtol=0, atol=1e-12)
    assert (y[1] - x[1]).abs().max() > 0.05
    # a third of a turn back: the red, green and blue pixels turn blue, red and green
    torch.testing.assert_close(
        y[5, :, 5, :3], torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_hue_shift_matches_torchvision_adjust_hue():
    # what DINO's ColorJitter does to a float image (torchvision computes in float32: 1e-6 apart)
    x = _hue_inputs(9, torch.float32)
    shift = torch.linspace(-0.1, 0.1, 9)
    y = hue_shift(x, shift)
    for i in range(9):
        torch.testing.assert_close(y[i], TF.adjust_hue(x[i], float(shift[i])), rtol=0, atol=1e-5)


def test_hue_shift_keeps_value_and_saturation_and_composes():
    x = _hue_inputs(4)
    a = torch.tensor([0.07, -0.3, 0.45, 0.0], dtype=torch.float64)
    b = torch.tensor([0.2, -0.25, 0.3, 1.0], dtype=torch.float64)
    y = hue_shift(x, a)
    torch.testing.assert_close(y.amax(1), x.amax(1), rtol=0, atol=1e-12)  # HSV value = max
    torch.testing.assert_close(y.amin(1), x.amin(1), rtol=0, atol=1e-12)  # max and min: saturation too
    torch.testing.assert_close(hue_shift(y, b), hue_shift(x, a + b), rtol=0, atol=1e-12)
    torch.testing.assert_close(hue_shift(x, torch.ones(4, dtype=torch.float64)), x, rtol=0, atol=1e-12)  # a full turn


def test_color_jitter_apply_false_is_identity():
    torch.manual_seed(17)
    x = torch.rand(4, 3, 6, 6)
    y = color_jitter(x.clone(), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_color_jitter_changes_only_applied_rows_and_stays_in_range():
    torch.manual_seed(18)
    x = torch.rand(4, 3, 6, 6)
    apply = torch.tensor([True, False, True, False])
    y = color_jitter(x.clone(), apply)
    torch.testing.assert_close(y[~apply], x[~apply], rtol=0, atol=1e-5)
    assert ((y[apply] - x[apply]).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
    assert y.min() >= 0 and y.max() <= 1


def test_color_jitter_brightness_only_scales():
    # With contrast, saturation and hue off, jitter multiplies the image by one factor in [0.6, 1.4].
    torch.manual_seed(19)
    x = torch.rand(3, 3, 5, 5) * 0.5
    y = color_jitter(x.clone(), torch.ones(3, dtype=torch.bool), brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    f = (y / x).reshape(3, -1)
    torch.testing.assert_close(f, f[:, :1].expand_as(f), rtol=0, atol=1e-4)
    assert (f[:, 0] >= 0.6 - 1e-5).all() and (f[:, 0] <= 1.4 + 1e-5).all()
    assert f[:, 0].std() > 1e-3


# ---------------------------------------------------------------- jitter: float64 reference formulas
def _luma64(x):
    """Luma (n, h, w) of (n, 3, h, w), float64, with the test's LUMA weights."""
    return np.einsum("c,nchw->nhw", LUMA, x)


def _reference_jitter(x, factors, order=None):
    """torchvision's brightness, contrast and saturation in float64, and the standard library's
    HSV hue shift by factors[:, 3] turns, each row in its ``order`` (default: that order);
    clamped to [0, 1] after each step."""
    x = x.double().numpy()
    f = factors.double().numpy()
    out = np.empty_like(x)
    for i in range(len(x)):
        b, c, s, hue = f[i]
        y = x[i : i + 1]
        for op in order[i].tolist() if order is not None else range(4):
            if op == 0:
                y = np.clip(y * b, 0, 1)  # brightness: scale
            elif op == 1:
                m = _luma64(y).mean()  # contrast pivots on the mean of the grayscale image
                y = np.clip(c * y + (1 - c) * m, 0, 1)
            elif op == 2:
                g = _luma64(y)[:, None]  # saturation blends with each pixel's luma
                y = np.clip(s * y + (1 - s) * g, 0, 1)
            else:
                y = _colorsys_hue(y, [hue])
        out[i] = y[0]
    return torch.from_numpy(out)


def _coloured(n, h=5, w=6, seed=30):
    """Random images with very unequal channel means (dark red, dim green, bright blue), so the
    mean luma (~0.28) differs clearly from the plain mean (~0.42)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64)
    return x * torch.tensor([0.2, 0.3, 0.2], dtype=torch.float64).view(1, 3, 1, 1) + torch.tensor(
        [0.0, 0.1, 0.8], dtype=torch.float64
    ).view(1, 3, 1, 1)


_FIXED_FACTORS = torch.tensor(
    [
        [1.0, 1.0, 1.0, 0.0],  # identity
        [1.3, 0.6, 1.2, 0.08],  # brightness clips, contrast/saturation/hue all on
        [0.7, 1.4, 0.8, -0.1],  # contrast stretch clips
        [1.0, 0.5, 1.0, 0.0],  # contrast alone: pivot on the mean luma
        [1.0, 1.0, 0.3, 0.0],
    ],
    dtype=torch.float64,
)  # saturation alone


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_jitter_fixed_factors_match_float64_reference(dtype, atol):
    # pins each jitter step's formula (contrast pivot = mean luma), its order and the clamps
    x = _coloured(len(_FIXED_FACTORS))
    y = _jitter(x.to(dtype), _FIXED_FACTORS.to(dtype))
    torch.testing.assert_close(y.double(), _reference_jitter(x.to(dtype), _FIXED_FACTORS), rtol=0, atol=atol)
    assert (x[1] * 1.3 > 1).any()  # the brightness clamp is exercised


def test_jitter_contrast_pivot_is_mean_luma_not_plain_mean():
    # contrast 0 maps every pixel of every channel to the mean of the image's luma
    x = _coloured(2)
    y = _jitter(x, torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2, dtype=torch.float64))
    pivot = torch.from_numpy(_luma64(x.numpy()).mean(axis=(1, 2)))
    torch.testing.assert_close(y, pivot.view(2, 1, 1, 1).expand_as(y), rtol=0, atol=1e-12)
    assert (pivot - x.mean(dim=(1, 2, 3))).abs().min() > 0.1  # the plain mean is far off


def test_jitter_brightness_contrast_saturation_match_torchvision():
    # with hue off, the jitter is torchvision's adjust_brightness -> adjust_contrast -> adjust_saturation
    # (torchvision's luma weights are 0.2989/0.587/0.114, hence the 1e-4 tolerance)
    x = _coloured(len(_FIXED_FACTORS))
    y = _jitter(x, torch.cat([_FIXED_FACTORS[:, :3], torch.zeros(len(x), 1, dtype=torch.float64)], 1))
    for i, (b, c, s, _) in enumerate(_FIXED_FACTORS.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s)
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-4)


def test_color_jitter_random_factors_match_float64_reference():
    # color_jitter = the reference formula with the factors jitter_factors draws (hue in turns)
    x = _coloured(6).float()
    apply = torch.tensor([True, True, False, True, True, True])
    torch.manual_seed(31)
    y = color_jitter(x.clone(), apply)
    torch.manual_seed(31)
    factors = jitter_factors(apply)
    order = jitter_order(6)
    assert len({tuple(o) for o in order.tolist()}) > 1  # the rows do not all share one order
    torch.testing.assert_close(y.double(), _reference_jitter(x, factors, order), rtol=0, atol=1e-5)


def test_jitter_order_is_per_row_and_both_paths_agree():
    # each row applies the four ops in its own order (torchvision's ColorJitter draws a permutation
    # per image); the order matters, and the CPU's grouped path equals the no-sync path used elsewhere
    x = _coloured(48).float()
    factors = _FIXED_FACTORS[torch.arange(48) % len(_FIXED_FACTORS)].float()
    order = jitter_order(48, generator=torch.Generator().manual_seed(5))
    y = _jitter(x.clone(), factors, order)
    torch.testing.assert_close(y.double(), _reference_jitter(x, factors, order), rtol=0, atol=1e-5)
    assert (y - _jitter(x.clone(), factors)).abs().amax() > 0.05  # not the fixed order
    torch.testing.assert_close(_jitter_all_rows(x.clone(), factors, order), y, rtol=0, atol=1e-6)


def test_jitter_orders_are_uniform_permutations():
    order = jitter_order(24000, generator=torch.Generator().manual_seed(6))
    assert (order.sort(1).values == torch.arange(4)).all()  # permutations
    counts = torch.unique(order @ torch.tensor([64, 16, 4, 1]), return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 850 and counts.max() < 1150  # 1000 each, sd ~31


def test_jitter_factor_ranges_and_hue_in_turns():
    # draws are U(1 +- 0.4), U(1 +- 0.4), U(1 +- 0.2) and the hue shift U(+-0.1) turn
    torch.manual_seed(32)
    apply = torch.arange(4000) % 4 != 0
    f = jitter_factors(apply)
    assert f.shape == (4000, 4)
    torch.testing.assert_close(f[~apply], torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(1000, 4), rtol=0, atol=0)
    on = f[apply]
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        span = hi - lo
        assert on[:, col].min() >= lo - 1e-6 and on[:, col].max() <= hi + 1e-6, col
        assert on[:, col].min() < lo + 0.02 * span and on[:, col].max() > hi - 0.02 * span, col


def test_color_jitter_hue_shifts_spread_over_a_tenth_of_a_turn():
    # hue=0.1 moves each image's HSV hue by shifts spread over [-0.1, 0.1] turn, value and saturation kept
    torch.manual_seed(33)
    n = 2000
    x = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1).repeat(n, 1, 1, 1)
    y = color_jitter(x.clone(), torch.ones(n, dtype=torch.bool), brightness=0, contrast=0, saturation=0, hue=0.1)
    h0, s0, v0 = colorsys.rgb_to_hsv(0.5, 0.3, 0.2)
    hsv = torch.tensor([colorsys.rgb_to_hsv(*p) for p in y[:, :, 0, 0].double().tolist()], dtype=torch.float64)
    kept = torch.tensor([[s0, v0]], dtype=torch.float64).expand(n, 2)
    torch.testing.assert_close(hsv[:, 1:], kept, rtol=0, atol=1e-6)
    moved = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
    assert moved.abs().max() <= 0.1 + 1e-6
    assert moved.max() > 0.098 and moved.min() < -0.098


# ---------------------------------------------------------------- photometric: per-op probabilities
def _photo_inputs(B=2, seed=34):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * B, 3, 8, 8, generator=g), torch.rand(3 * B, 3, 6, 6, generator=g)


def _denorm(x):
    return x.double() * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1) + torch.tensor(
        MEAN, dtype=torch.float64
    ).view(1, 3, 1, 1)


_OFF = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0), solarization_prob=0.0)


def test_photometric_all_probabilities_zero_is_normalisation_only():
    # with every op off, photometric is (x - mean) / std
    g, l = _photo_inputs()
    out_g, out_l = _aug(**_OFF).photometric(g, l)
    torch.testing.assert_close(_denorm(out_g), g.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(_denorm(out_l), l.double(), rtol=0, atol=1e-6)


def test_photometric_grayscale_prob_one_gives_luma_in_every_channel():
    # grayscale replaces every channel of every crop (globals and locals) with the luma
    g, l = _photo_inputs()
    out_g, out_l = _aug(**{**_OFF, "grayscale_prob": 1.0}).photometric(g, l)
    for x, out in ((g, out_g), (l, out_l)):
        luma = torch.from_numpy(_luma64(x.double().numpy()))[:, None]
        torch.testing.assert_close(_denorm(out), luma.expand_as(out), rtol=0, atol=1e-6)


def test_photometric_solarization_only_on_second_global_view():
    # solarize p=1 inverts pixels >= 128 (PIL's ImageOps.solarize) of global view 2 only
    B = 2
    g = (torch.arange(2 * B * 3 * 16 * 16) % 256).to(torch.uint8).view(2 * B, 3, 16, 16)
    l = (torch.arange(3 * B * 3 * 8 * 8) * 7 % 256).to(torch.uint8).view(3 * B, 3, 8, 8)
    out_g, out_l = _aug(**{**_OFF, "solarization_prob": 1.0}).photometric(g, l)

    def pil_solarize(crop):
        img = ImageOps.solarize(Image.fromarray(crop.permute(1, 2, 0).numpy()), threshold=128)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

    expected_g = torch.cat([g[:B], torch.stack([pil_solarize(c) for c in g[B:]])])
    torch.testing.assert_close(_denorm(out_g), expected_g.double() / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(_denorm(out_l), l.double() / 255, rtol=0, atol=1e-6)


@pytest.mark.parametrize("blur_prob", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_photometric_blur_probability_per_view(blur_prob):
    # blur_prob = (global view 1, global view 2, locals): only the p=1 group is blurred (sigma fixed at 1)
    B = 2
    g, l = _photo_inputs(B)
    out_g, out_l = _aug(**{**_OFF, "blur_prob": blur_prob, "blur_sigma": (1.0, 1.0)}).photometric(g, l)
    groups = [(out_g[:B], g[:B]), (out_g[B:], g[B:]), (out_l, l)]
    for p, (out, x) in zip(blur_prob, groups):
        expected = _reference_blur(x, 1.0, 3) if p else x.double()
        torch.testing.assert_close(_denorm(out), expected, rtol=0, atol=1e-6)


def test_photometric_default_probabilities_are_dinos():
    # DINO's defaults: grayscale 0.2 everywhere, blur 1.0 / 0.1 / 0.5, solarize 0 / 0.2 / 0 (view 1 / 2 / locals)
    torch.manual_seed(35)
    B, n_local = 200, 2
    aug = _aug(local_crops_number=n_local, color_jitter_prob=0.0, blur_sigma=(1.0, 1.0))
    g = torch.rand(2 * B, 3, 5, 5) * 0.4 + 0.55  # all > 0.5, so blur and gray stay > 0.5 and solarize < 0.5
    l = torch.rand(n_local * B, 3, 5, 5) * 0.4 + 0.55
    out_g, out_l = aug.photometric(g, l)
    stats = []
    for x, out in ((g[:B], out_g[:B]), (g[B:], out_g[B:]), (l, out_l)):
        y = _denorm(out)
        gray = (y - y[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6
        solar = y.amax(dim=(1, 2, 3)) < 0.5
        y = torch.where(solar.view(-1, 1, 1, 1), 1 - y, y)
        src = x.double()
        src = torch.where(gray.view(-1, 1, 1, 1), torch.from_numpy(_luma64(src.numpy()))[:, None].expand_as(src), src)
        blurred = (y - src).abs().amax(dim=(1, 2, 3)) > 1e-5
        stats.append((gray.float().mean().item(), blurred.float().mean().item(), solar.float().mean().item()))
    (g1, b1, s1), (g2, b2, s2), (gl, bl, sl) = stats
    assert all(0.1 < p < 0.3 for p in (g1, g2, gl)), stats
    assert b1 == 1.0 and 0.03 < b2 < 0.2 and 0.4 < bl < 0.6, stats
    assert s1 == 0.0 and 0.12 < s2 < 0.3 and sl == 0.0, stats
