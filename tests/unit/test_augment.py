import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.augment import (
    Crop,
    DeviceAugment,
    crop_view,
    draft_for,
    resize_view,
    sample_crop,
)


def _jpeg(w=300, h=200):
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_crop_view_takes_the_box_it_is_given():
    arr = np.zeros((40, 40), np.uint8)
    arr[10:20, 20:30] = 255  # a white square, centre (25, 15), side 10
    out = crop_view(Image.fromarray(arr), Crop(cx=25, cy=15, w=10, h=10), 8, 1)
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    assert out[0, 1:-1, 1:-1].min() > 200  # inside: white
    flipped = crop_view(Image.fromarray(arr), Crop(cx=25, cy=15, w=20, h=10, flip=True), 8, 1)
    plain = crop_view(Image.fromarray(arr), Crop(cx=25, cy=15, w=20, h=10), 8, 1)
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize(
    "channels, src, crop, size",
    [
        (3, (300, 200), Crop(cx=120.3, cy=90.8, w=150.6, h=110.2), 96),  # downscale
        (3, (300, 200), Crop(cx=40.0, cy=30.0, w=34.4, h=40.6, flip=True), 64),  # upscale
        (1, (64, 48), Crop(cx=32.0, cy=24.0, w=64.0, h=48.0), 100),  # whole image, gray
    ],
)
def test_crop_view_matches_pillow_resize_of_the_integer_box(channels, src, crop, size):
    """Reference: what torchvision's RandomResizedCrop does to a PIL image: the crop rounded to
    whole pixels cut out (``crop``), then Pillow's bilinear ``resize``, flipped with Pillow."""
    rng = np.random.default_rng(0)
    shape = (12, 16, 3) if channels == 3 else (12, 16)
    low = rng.integers(0, 256, shape, dtype=np.uint8)
    im = Image.fromarray(low).resize(src, Image.Resampling.BICUBIC)  # smooth, like a photo
    im = Image.fromarray(np.asarray(im) // 2 + rng.integers(0, 64, np.asarray(im).shape, np.uint8))
    box = (
        round(crop.cx - crop.w / 2),
        round(crop.cy - crop.h / 2),
        round(crop.cx - crop.w / 2) + round(crop.w),
        round(crop.cy - crop.h / 2) + round(crop.h),
    )
    ref = im.crop(box).resize((size, size), Image.Resampling.BILINEAR)
    if crop.flip:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ref_t = torch.from_numpy(np.asarray(ref).reshape(size, size, channels).copy()).permute(2, 0, 1)
    out = crop_view(im, crop, size, channels)
    assert out.shape == (channels, size, size) and out.dtype == torch.uint8
    diff = (out.int() - ref_t.int()).abs()
    # torch's uint8 filter rounds its fixed-point sums a little differently: one grey level
    assert diff.max() <= 1 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())


@pytest.mark.parametrize("flip", [False, True])
def test_a_crop_under_32_pixels_keeps_its_sub_pixel_box(flip):
    """Reference: Pillow's bilinear ``resize`` from the exact fractional box (an 8 px digit
    would lose most of its crop variety to whole-pixel rounding)."""
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
    crop = Crop(cx=4.3, cy=3.9, w=5.6, h=6.3, flip=flip)
    ref = im.resize((16, 16), Image.Resampling.BILINEAR, box=(1.5, 0.75, 7.1, 7.05))
    if flip:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = crop_view(im, crop, 16, 1)
    assert torch.equal(out[0], torch.from_numpy(np.asarray(ref).copy()))


def test_jpeg_draft_decode_matches_a_full_decode_closely():
    crop = Crop(cx=150, cy=100, w=200, h=200)
    fast = crop_view(_jpeg(), crop, 24, 3).float()
    full = crop_view(_jpeg().convert("RGB"), crop, 24, 3).float()  # decoded before: no draft
    assert fast.shape == (3, 24, 24)
    assert (fast - full).abs().mean() < 12  # same picture, different resampling path


def test_sample_crop_stays_in_bounds_and_is_seeded():
    for seed in range(50):
        c = sample_crop(random.Random(seed), 300, 200, (0.08, 1.0))
        assert 0 < c.w <= 300 and 0 < c.h <= 200
        assert c.w / 2 - 1e-6 <= c.cx <= 300 - c.w / 2 + 1e-6
    assert sample_crop(random.Random(1), 50, 50, (0.2, 1)) == sample_crop(
        random.Random(1), 50, 50, (0.2, 1)
    )


def test_resize_view_is_a_centre_square():
    out = resize_view(_jpeg(300, 200), 32, 3)
    assert out.shape == (3, 32, 32)


def test_device_augment_is_seeded_normalised_and_covers_small_crops():
    aug = AugmentConfig(
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_prob=0.5,
        solarize_prob=0.2,
        noise_std=0.0,
    )
    data = DataConfig(channels=3, image_size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    device_aug = DeviceAugment(aug, data)
    g = torch.Generator().manual_seed(0)
    batch = {
        "view1": torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g),
        "view2": torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g),
        "small_crops": torch.randint(0, 256, (6, 2, 3, 8, 8), dtype=torch.uint8, generator=g),
        "label": torch.arange(6),
    }
    a, b, c = device_aug(batch, seed=1), device_aug(batch, seed=1), device_aug(batch, seed=2)
    assert a["view1"].dtype == torch.float32 and a["small_crops"].shape == (6, 2, 3, 8, 8)
    assert torch.equal(a["view1"], b["view1"]) and not torch.equal(a["view1"], c["view1"])
    assert a["view1"].min() >= -2 - 1e-6 and a["view1"].max() <= 2 + 1e-6  # (x - .5) / .25
    assert torch.equal(a["label"], batch["label"])
    state = torch.get_rng_state()
    device_aug(batch, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


@pytest.mark.parametrize(
    ("channels", "saturation", "hue"), [(1, 0.0, 0.0), (3, 0.0, 0.0), (3, 0.4, 0.1)]
)
def test_jitter_on_the_cpu_skips_neutral_steps_bit_for_bit(monkeypatch, channels, saturation, hue):
    """On the CPU kornia's guarded path runs (only the steps that move some sample); its output
    is the fixed-order branch-free path's, bit for bit, gray digits included."""
    aug = AugmentConfig(brightness=0.3, contrast=0.3, saturation=saturation, hue=hue)
    data = DataConfig(
        channels=channels, image_size=32, mean=[0.5] * channels, std=[0.25] * channels
    )
    device_aug = DeviceAugment(aug, data)
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randint(0, 256, (16, channels, 32, 32), dtype=torch.uint8, generator=g)}
    fast = [device_aug(batch, seed=s)["view1"] for s in range(6)]
    used = [j for j in device_aug.jitters if j._cond_fn is None]  # the guarded path ran
    assert used
    monkeypatch.setattr(DeviceAugment, "reads_free", staticmethod(lambda x: False))
    slow = [device_aug(batch, seed=s)["view1"] for s in range(6)]
    assert all(j._cond_fn is not None for j in used)  # the same seeds draw the same jitters
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fast[0], fast[1])  # the jitter did move the samples


def _halves_jpeg() -> Image.Image:
    arr = np.zeros((512, 512, 3), np.uint8)
    arr[:, 256:] = 255  # left half black, right half white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_crops_of_one_image_agree_when_one_is_decoded_at_a_reduced_scale():
    im = _halves_jpeg()
    crop_view(im, Crop(cx=256, cy=256, w=512, h=512), 64, 3, (512, 512))  # JPEG draft, 1/8
    assert im.size == (64, 64)
    right = crop_view(im, Crop(cx=384, cy=256, w=200, h=200), 64, 3, (512, 512))
    assert right.float().mean() > 250  # still the white half, in the header's coordinates


def test_the_crops_of_an_image_share_the_scale_the_most_demanding_one_needs():
    full, small = Crop(cx=256, cy=256, w=512, h=512), Crop(cx=384, cy=256, w=200, h=200)
    im = _halves_jpeg()
    draft_for(im, [(full, 64), (small, 64)])  # the small crop needs a 1/2-scale decode at least
    crop_view(im, full, 64, 3, (512, 512))
    assert im.size == (256, 256)
    im = _halves_jpeg()
    draft_for(im, [(full, 64), (small, 150)])  # ... and this one the full scale
    crop_view(im, full, 64, 3, (512, 512))
    assert im.size == (512, 512)
