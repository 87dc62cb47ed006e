"""Bad data never stops a run: planted faults are skipped and counted exactly."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.loader import train_loader
from dist_contrast.data.pipeline import read_captioned
from dist_contrast.data.shards import resolve_shards

PER_SHARD = 12


def _jpeg(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(tmp_path, n_shards=4):
    for s in range(n_shards):
        with wds.TarWriter(str(tmp_path / f"s-{s:02d}.tar")) as w:
            for i in range(PER_SHARD):
                idx = s * PER_SHARD + i
                w.write(
                    {
                        "__key__": f"{idx:06d}",
                        "jpg": _jpeg(idx),
                        "txt": f"caption {idx}",
                        "json": json.dumps({"index": idx}),
                    }
                )


def _rewrite(path, change):
    """Rewrite one sample of a shard: ``change(sample) -> sample``."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as w:
        for k, s in enumerate(samples):
            s = {key: v for key, v in s.items() if not key.startswith("__") or key == "__key__"}
            w.write(change(s) if k == 3 else s)


@pytest.fixture
def faulty(tmp_path):
    _write(tmp_path)
    _rewrite(tmp_path / "s-00.tar", lambda s: {**s, "jpg": b"\xff\xd8 this is no jpeg"})
    _rewrite(tmp_path / "s-01.tar", lambda s: {k: v for k, v in s.items() if k != "txt"})
    _rewrite(tmp_path / "s-02.tar", lambda s: {**s, "txt": b"   "})
    data = (tmp_path / "s-03.tar").read_bytes()
    (tmp_path / "s-03.tar").write_bytes(data[: len(data) // 2 + 700])  # cut inside a member
    (tmp_path / "s-04.tar").write_bytes(b"not a tar at all")
    return tmp_path


def _full_epoch(shards, **data):
    cfg = DataConfig(
        train_shards=shards,
        channels=3,
        image_size=8,
        require_caption=True,
        shuffle_buffer=0,
        **data,
    )
    seen, faults = [], {}
    for rank in range(2):
        loader = train_loader(cfg, AugmentConfig(), 1, seed=0, rank=rank, world=2)
        seen += [int(b["index"]) for b in loader.iter_epoch()]
        for k, v in loader.faults().items():
            faults[k] = faults.get(k, 0) + v
    return seen, faults


def test_planted_faults_are_skipped_and_counted_exactly(faulty):
    seen, faults = _full_epoch(str(faulty / "s-*.tar"), num_workers=2)
    # 4 good-format shards x 12 samples; s-03 keeps only its first samples.
    assert faults == {
        "unreadable_shard": 1,
        "truncated_shard": 1,
        "corrupt_image": 1,
        "oversized_image": 0,
        "missing_image": 0,
        "missing_caption": 1,
        "empty_caption": 1,
    }
    kept_of_truncated = sum(1 for i in seen if 36 <= i < 48)
    assert 0 < kept_of_truncated < PER_SHARD
    assert len(seen) == 3 * PER_SHARD - 3 + kept_of_truncated
    assert {3, 15, 27}.isdisjoint(seen)  # the planted samples


def test_oversized_images_are_rejected_from_the_header(tmp_path):
    _write(tmp_path, n_shards=2)
    _rewrite(tmp_path / "s-01.tar", lambda s: {**s, "jpg": _jpeg(0, size=100)})
    _, faults = _full_epoch(str(tmp_path / "s-*.tar"), max_image_pixels=1000, num_workers=0)
    assert faults["oversized_image"] == 1 and sum(faults.values()) == 1


def test_warnings_are_rate_limited(tmp_path, capfd):
    with wds.TarWriter(str(tmp_path / "s-00.tar")) as w:
        for i in range(40):
            w.write({"__key__": f"{i:06d}", "jpg": _jpeg(i), "txt": "" if i % 2 else "x"})
    (tmp_path / "s-01.tar").write_bytes((tmp_path / "s-00.tar").read_bytes())
    _, faults = _full_epoch(str(tmp_path / "s-*.tar"), num_workers=0, warn_every_s=3600)
    assert faults["empty_caption"] == 40
    err = capfd.readouterr().err
    assert err.count("(empty_caption)") == 2  # one line per rank, not one per sample


def test_eval_reader_skips_bad_data_too(faulty):
    images, labels = read_captioned(
        resolve_shards(str(faulty / "s-*.tar")), DataConfig(channels=3), require_caption=False
    )[:2]
    assert len(images) == len(labels) > 30
