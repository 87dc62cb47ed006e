"""Shards in img2dataset's output layout are read as they are, with no data option changed."""

import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.loader import train_loader
from dist_contrast.data.pipeline import read_captioned
from dist_contrast.data.shards import resolve_shards


def _img2dataset_folder(root, n_shards=2, per_shard=10, caption_in="txt"):
    """What `img2dataset --output_format webdataset` writes: NNNNN.tar with 9-digit keys,
    jpg + txt + json per sample, and NNNNN_stats.json (and .parquet) beside each shard."""
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                h, w_ = int(rng.integers(30, 60)), int(rng.integers(30, 60))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)).save(buf, "JPEG")
                meta = {
                    "url": f"https://example.org/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": w_,
                    "height": h,
                    "original_width": 2 * w_,
                    "original_height": 2 * h,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                sample = {"__key__": key, "jpg": buf.getvalue()}
                if caption_in == "txt":
                    sample["txt"] = f"a photo number {key}"
                else:
                    meta["caption"] = f"a photo number {key}"
                sample["json"] = json.dumps(meta)
                w.write(sample)
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1")


def _read(root, caption_required=False):
    cfg = DataConfig(
        train_shards=str(root / "{00000..00001}.tar"),
        channels=3,
        image_size=16,
        require_caption=caption_required,
    )
    loader = train_loader(cfg, AugmentConfig(), 4, seed=0, rank=0, world=1)
    return list(loader.iter_epoch()), loader.faults()


def test_img2dataset_layout_is_read_as_is(tmp_path):
    _img2dataset_folder(tmp_path)
    batches, faults = _read(tmp_path)
    assert len(batches) == 5 and sum(faults.values()) == 0
    b = batches[0]
    assert b["view1"].shape == (4, 3, 16, 16)
    assert all(c.startswith("a photo number ") for c in b["caption"])
    assert (b["label"] == -1).all()
    images, _ = read_captioned(
        resolve_shards(str(tmp_path / "*.tar")), DataConfig(channels=3), require_caption=False
    )[:2]
    assert images.shape == (20, 3, 16, 16)


def test_caption_from_the_json_field(tmp_path):
    _img2dataset_folder(tmp_path, caption_in="json")
    batches, faults = _read(tmp_path, caption_required=True)
    assert len(batches) == 5 and faults["missing_caption"] == 0
    assert batches[0]["caption"][0].startswith("a photo number ")
