"""Views: geometric crops per sample in the loader workers (uint8 out), per-pixel ops
batched on the training device (kornia). Both reproducible under a seed.

Crop: random resized crop (area fraction and aspect ratio), an optional small rotation and
shift, an optional horizontal flip. A crop inside the image is cut at whole pixels and resized
with torch's anti-aliased bilinear filter on uint8 channels-last pixels (what torchvision's
RandomResizedCrop does, about twice as fast per core as Pillow's resize); a crop under 32 source
pixels keeps its sub-pixel box (Pillow), and a rotated or shifted crop is one affine resampling.
JPEGs are decoded once per image, at a reduced scale (DCT scaling, ``draft``) when every crop of
it is much larger than its output, so large images cost little to crop small.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.decode import oriented_size, to_mode


@dataclass
class Crop:
    """A crop in input pixels: centre, size, rotation (degrees), horizontal flip."""

    cx: float
    cy: float
    w: float
    h: float
    angle: float = 0.0
    flip: bool = False


def sample_crop(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    rotation_deg: float = 0.0,
    translate: float = 0.0,
    flip_prob: float = 0.0,
    tries: int = 10,
) -> Crop:
    """A random resized crop as torchvision's RandomResizedCrop draws it: area fraction in
    ``scale``, aspect ratio log-uniform in [3/4, 4/3], redrawn (up to ``tries`` times) until the
    box fits the image, else a centre crop of the whole image clamped to that aspect range; then
    the optional shift, rotation and flip."""
    ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(tries):
        area = rng.uniform(*scale) * width * height
        aspect = math.exp(rng.uniform(*ratio))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= width and h <= height:
            break
    else:
        aspect = min(max(width / height, 3 / 4), 4 / 3)
        w, h = min(float(width), height * aspect), min(float(height), width / aspect)
    cx = rng.uniform(w / 2, width - w / 2) + rng.uniform(-translate, translate) * width
    cy = rng.uniform(h / 2, height - h / 2) + rng.uniform(-translate, translate) * height
    angle = rng.uniform(-rotation_deg, rotation_deg) if rotation_deg else 0.0
    return Crop(cx, cy, w, h, angle, rng.random() < flip_prob)


def draft_for(im: Image.Image, crops: list[tuple[Crop, int]]) -> None:
    """Before any crop of ``im``: fix the scale a JPEG is decoded at (``draft``, DCT scaling) to
    the smallest that keeps every (crop, output size) at least its output size. Pillow honours
    only the first draft of an image, so this one decides for all the crops of it."""
    if im.format != "JPEG":
        return
    factor = max(1.0, min(min(crop.w, crop.h) / size for crop, size in crops))
    im.draft(im.mode, (math.ceil(im.size[0] / factor), math.ceil(im.size[1] / factor)))


# Crops narrower than this many source pixels keep their sub-pixel box: whole-pixel rounding
# would be a large share of them (an 8 px digit), and they cost little to resample with Pillow.
SUBPIXEL_BELOW = 32


def crop_views(
    im: Image.Image,
    crops: list[tuple[Crop, int]],
    channels: int,
    full_size: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Each (crop, size) of one image resampled to size x size: uint8 tensors [C, size, size].
    The image is decoded once for all of them, at the scale :func:`draft_for` picks for the set.
    Crops are in pixels of ``full_size`` (the image's size before any draft, once its EXIF
    orientation is applied; default :func:`~dist_contrast.data.decode.oriented_size`), also
    when ``im`` was decoded at a reduced scale already.

    A crop inside the image and at least ``SUBPIXEL_BELOW`` pixels wide and high (the random
    resized crops of photos) is cut at whole pixels, as torchvision's RandomResizedCrop cuts
    it, and resized with torch's anti-aliased bilinear filter on uint8 channels-last pixels
    (within a grey level of Pillow's crop + resize, about half its CPU time). A smaller crop
    is resized by Pillow from its exact sub-pixel box; a rotated crop, or one shifted out of
    the image, is one affine resampling (Pillow), zero outside."""
    full_w = (full_size or oriented_size(im))[0]
    draft_for(im, crops)  # no-op when the pixels are decoded already
    im = to_mode(im, channels)  # oriented
    f = im.size[0] / full_w
    pixels: torch.Tensor | None = None
    out = []
    for crop, size in crops:
        box = _whole_pixel_box(crop, f, im.size)
        if box is None:
            out.append(_pillow_view(im, crop, size, channels, f))
            continue
        if pixels is None:
            pixels = _to_tensor(im, channels)[None]  # [1, C, H, W] over HWC memory
        out.append(_resize_box(pixels, box, size, crop.flip))
    return out


def crop_view(
    im: Image.Image,
    crop: Crop,
    size: int,
    channels: int,
    full_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One crop of ``im`` (see :func:`crop_views`): uint8 tensor [C, size, size]."""
    return crop_views(im, [(crop, size)], channels, full_size)[0]


def _whole_pixel_box(
    crop: Crop, f: float, im_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The crop (scaled by ``f``) as whole-pixel (left, top, right, bottom) inside the image;
    None when it is rotated, narrower than ``SUBPIXEL_BELOW`` or reaches outside the image by
    more than rounding."""
    cx, cy, w, h = crop.cx * f, crop.cy * f, crop.w * f, crop.h * f
    if crop.angle != 0 or min(w, h) < SUBPIXEL_BELOW:
        return None
    width, height = im_size
    bw, bh = min(round(w), width), min(round(h), height)
    left, top = round(cx - w / 2), round(cy - h / 2)
    if left < -1 or top < -1 or left + bw > width + 1 or top + bh > height + 1:
        return None
    left, top = min(max(left, 0), width - bw), min(max(top, 0), height - bh)
    return left, top, left + bw, top + bh


def _resize_box(
    pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool
) -> torch.Tensor:
    left, top, right, bottom = box
    x = pixels[:, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0]
    return out.flip(-1) if flip else out


def _pillow_view(im: Image.Image, crop: Crop, size: int, channels: int, f: float) -> torch.Tensor:
    """The crop resampled by Pillow from its exact box: a separable resize when it is not
    rotated and lies inside the image, else one affine resampling."""
    k = int(min(crop.w, crop.h) * f / size)
    if k >= 2:  # integer box reduction first: an anti-aliased, cheap downscale
        im = im.reduce(k)
        f /= k
    cx, cy, sx, sy = crop.cx * f, crop.cy * f, crop.w * f / size, crop.h * f / size
    box = _box_inside(cx, cy, crop.w * f, crop.h * f, im.size)
    if crop.angle == 0 and box is not None:
        out = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if crop.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out, channels)
    cos, sin = math.cos(math.radians(crop.angle)), math.sin(math.radians(crop.angle))
    fx = -1.0 if crop.flip else 1.0
    a, b, d, e = fx * sx * cos, -sy * sin, fx * sx * sin, sy * cos
    half = size / 2
    coeffs = (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)
    out = im.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return _to_tensor(out, channels)


def _box_inside(
    cx: float, cy: float, w: float, h: float, im_size: tuple[int, int], eps: float = 1e-6
) -> tuple[float, float, float, float] | None:
    """The crop as (left, top, right, bottom) when it lies inside the image (up to rounding)."""
    left, top, right, bottom = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    width, height = im_size
    if left < -eps or top < -eps or right > width + eps or bottom > height + eps:
        return None
    return max(left, 0.0), max(top, 0.0), min(right, width), min(bottom, height)


def resize_view(im: Image.Image, size: int, channels: int) -> torch.Tensor:
    """The evaluation view: shorter side to ``size``, centre crop; uint8 [C, size, size]."""
    w, h = oriented_size(im)
    side = min(w, h)
    crop = Crop(w / 2, h / 2, side, side)
    return crop_view(im, crop, size, channels)


def _to_tensor(im: Image.Image, channels: int) -> torch.Tensor:
    """uint8 [C, H, W], a view of the HWC pixels (channels-last strides): no transpose copy per
    view. :func:`dist_contrast.data.pipeline.collate` stacks such views as HWC (one plain copy)
    and the device side converts to float and contiguous in one step."""
    arr = np.asarray(im, dtype=np.uint8)  # PIL hands over read-only bytes; never written to
    if channels == 1:
        arr = arr[:, :, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable"
        return torch.from_numpy(arr).permute(2, 0, 1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any strides) -> contiguous float in [0, 1]; float input -> contiguous."""
    if x.dtype == torch.uint8:
        return x.to(dtype=torch.float32, memory_format=torch.contiguous_format) / 255.0
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format)


class Normalize(nn.Module):
    """uint8 or [0, 1] pixels -> (x - mean) / std, per channel."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = to_float(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class DeviceAugment(nn.Module):
    """Colour jitter, grayscale, blur, solarize and noise on whole batches on the training
    device, seeded per call so a step's views depend only on (seed, step, rank)."""

    VIEW_KEYS = ("view1", "view2", "small_crops")

    def __init__(self, aug: AugmentConfig, data: DataConfig) -> None:
        super().__init__()
        import kornia.augmentation as K

        ops: list[nn.Module] = []
        # Colour jitter in a random order per call, as torchvision's, but the order drawn on the
        # host (from the call's seed): kornia's own random order is a device tensor it reads
        # back, and it then reads each factor to skip neutral steps, five host reads per view;
        # with a fixed order on RGB (gray is jittered as RGB) it selects with torch.where and
        # reads nothing.
        self.jitters = nn.ModuleList()
        if aug.jitter_prob > 0 and max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
            for order in itertools.permutations(range(4)):
                self.jitters.append(
                    K.ColorJitter(
                        aug.brightness,
                        aug.contrast,
                        aug.saturation,
                        aug.hue,
                        p=aug.jitter_prob,
                        order=order,
                    )
                )
        # kornia's fixed-order path computes all four steps (the HSV round trip of hue even at
        # hue=0) and keeps each with torch.where; its other path runs only the steps that move
        # some sample, deciding with a host read each. A host read is free on the CPU, so there
        # that path is taken: the same output bit for bit, 2.7x faster on gray digits at 64 px
        # with saturation and hue 0 (36 to 13.5 ms per batch of 64). On a GPU, no reads.
        self._branch_free = [getattr(j, "_cond_fn", None) for j in self.jitters]
        if aug.grayscale_prob > 0:
            ops.append(K.RandomGrayscale(p=aug.grayscale_prob))
        if aug.blur_prob > 0:
            k = max(3, int(0.1 * data.image_size) | 1)
            ops.append(K.RandomGaussianBlur((k, k), (0.1, aug.blur_sigma_max), p=aug.blur_prob))
        if aug.solarize_prob > 0:
            ops.append(K.RandomSolarize(0.0, 0.0, p=aug.solarize_prob))
        self.ops = nn.Sequential(*ops)
        self.noise_std = aug.noise_std
        self.normalize = Normalize(data.mean, data.std)

    @staticmethod
    def reads_free(x: torch.Tensor) -> bool:
        """Whether reading a value of ``x`` to the host costs nothing (a CPU tensor)."""
        return x.device.type == "cpu"

    def _one(self, x: torch.Tensor, draw: random.Random) -> torch.Tensor:
        x = to_float(x)
        if len(self.jitters):
            index = draw.randrange(len(self.jitters))
            jitter = self.jitters[index]
            if hasattr(jitter, "_cond_fn"):  # see __init__
                jitter._cond_fn = None if self.reads_free(x) else self._branch_free[index]
            if x.shape[1] == 1:  # gray as RGB (saturation and hue leave it gray): no reads
                x = jitter(x.repeat(1, 3, 1, 1))[:, :1]
            else:
                x = jitter(x)
        if len(self.ops):
            x = self.ops(x)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return self.normalize(x.clamp(0, 1))

    @torch.no_grad()
    def forward(self, batch: dict, seed: int) -> dict:
        out = dict(batch)
        devices = [batch["view1"].device] if batch["view1"].is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            draw = random.Random(seed)  # host draws (the jitter orders): no device reads
            for key in self.VIEW_KEYS:
                if key not in batch:
                    continue
                x = batch[key]
                if key == "small_crops":  # [B, n, C, s, s]
                    b, n = x.shape[:2]
                    out[key] = self._one(x.flatten(0, 1), draw).view(b, n, *x.shape[2:])
                else:
                    out[key] = self._one(x, draw)
        return out
