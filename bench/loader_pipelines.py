"""The two pipelines that ``dist_contrast_bench.loader`` times: the training loader ("ours")
and a plain webdataset + PIL baseline doing the same work.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_PROB = 0.5
# SimCLR's per-pixel augmentation (Chen et al. 2020, appendix A), as ours runs it on the device.
SIMCLR_PIXEL_OPS = dict(
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_prob=0.5,
    blur_sigma_max=2.0,
    solarize_prob=0.2,
    noise_std=0.0,
)


# --------------------------------------------------------------------------------------------
# The two pipelines: one warm-up epoch, then an endless stream of batches over the epochs.


class Ours:
    """``dist_contrast.data.loader.train_loader``: its workers live across epochs."""

    def __init__(self, urls: list[str], args: argparse.Namespace, workers: int) -> None:
        from dist_contrast.data.loader import train_loader

        data, augment = configs(args, urls, workers)
        self.loader = train_loader(data, augment, args.batch_size, seed=0, rank=0, world=1)

    def epoch(self) -> Iterator:
        return self.loader.iter_epoch()

    def stream(self) -> Iterator:
        return iter(self.loader)


def configs(args: argparse.Namespace, urls: list[str], workers: int):
    from dist_contrast.config import AugmentConfig, DataConfig

    data = DataConfig(
        train_shards=list(urls),
        num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
        image_size=args.image_size,
        channels=3,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    augment = AugmentConfig(
        crop_scale_min=SCALE[0],
        crop_scale_max=SCALE[1],
        rotation_deg=0.0,
        translate=0.0,
        flip_prob=FLIP_PROB,
        **SIMCLR_PIXEL_OPS,
    )
    return data, augment


def rrc_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """The crop box of torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop
    clamped to the aspect range): (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TwoViews:
    """(PIL image, label) -> (view1, view2, label): the common PIL-only random resized crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def view(self, img: Image.Image) -> torch.Tensor:
        box = rrc_box(random, *img.size)
        out = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if random.random() < FLIP_PROB:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __call__(self, sample: tuple) -> tuple:
        img, label = sample
        return self.view(img), self.view(img), label


class Baseline:
    """webdataset + PIL through a default DataLoader: its workers start at each epoch."""

    def __init__(self, urls: list[str], args: argparse.Namespace, workers: int) -> None:
        import webdataset as wds
        from torch.utils.data import DataLoader

        dataset = (
            wds.WebDataset(urls, shardshuffle=len(urls))
            .shuffle(args.shuffle_buffer)
            .decode("pil")
            .to_tuple("jpg", "cls")
            .map(TwoViews(args.image_size))
            .batched(args.batch_size, partial=False)
        )
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers)

    def epoch(self) -> Iterator:
        return iter(self.loader)

    def stream(self) -> Iterator:
        return (batch for _ in itertools.count() for batch in self.loader)


PIPELINES: dict[str, Callable[[list[str], argparse.Namespace, int], Ours | Baseline]] = {
    "ours": Ours,
    "baseline": Baseline,
}


def _checked(batch, size: int, batch_size: int) -> int:
    """The samples in a batch, after checking its layout: two uint8 views [B, 3, S, S]."""
    if isinstance(batch, dict):
        v1, v2, label = batch["view1"], batch["view2"], batch["label"]
    else:
        v1, v2, label = batch
    want = (batch_size, 3, size, size)
    if v1.shape != want or v2.shape != want or v1.dtype != torch.uint8 or len(label) != want[0]:
        raise RuntimeError(f"unexpected batch: {tuple(v1.shape)} {v1.dtype}, want {want}")
    return want[0]
