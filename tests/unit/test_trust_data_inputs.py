"""Odd inputs the loader must neither block on nor die of nor train on as garbage: paths that are
not regular files (a real FIFO, a directory, a character device), batches of samples with and
without a caption, 16-bit and other PIL modes, EXIF orientation. References are independent:
numpy on the raw arrays, PIL's own ``ImageOps.exif_transpose``."""

from __future__ import annotations

import io
import json
import os
import threading

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageOps

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.augment import resize_view
from dist_contrast.data.decode import decode_sample
from dist_contrast.data.loader import train_loader
from dist_contrast.data.pipeline import ReaderStream, collate, read_captioned, retry_of
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.sources import Reader, Source, first_sample
from dist_contrast.data.tario import Faults, Retry, tar_samples
from dist_contrast.errors import ConfigError, DataError

from conftest import config_from_dict


def _png(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **save)
    return buf.getvalue()


def _shard(path, n: int, caption=lambda i: f"caption {i}", image=None) -> None:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            arr = rng.integers(0, 255, (12, 12), dtype=np.uint8)
            sample = {
                "__key__": f"{i:06d}",
                "png": image(i) if image else _png(Image.fromarray(arr)),
                "json": json.dumps({"index": i}),
            }
            if caption(i) is not None:
                sample["txt"] = caption(i)
            w.write(sample)


# ---- 1. paths that are not regular files ------------------------------------------------


def _odd_paths(tmp_path):
    """Two real shards, then a FIFO, a directory and a link to a character device that all
    match ``s-*.tar``; the FIFO sorts first."""
    _shard(tmp_path / "s-1.tar", 4)
    _shard(tmp_path / "s-2.tar", 4)
    os.mkfifo(tmp_path / "s-0.tar")
    (tmp_path / "s-00.tar").mkdir()
    (tmp_path / "s-zero.tar").symlink_to("/dev/zero")
    return tmp_path


def test_paths_that_are_not_regular_files_are_skipped_and_named(tmp_path, capfd):
    d = _odd_paths(tmp_path)
    urls = resolve_shards([str(d / "s-*.tar"), str(d / "s-00.tar"), "/dev/null"], "data.x")
    assert urls == [str(d / "s-1.tar"), str(d / "s-2.tar")]
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "skipped" in ln]
    assert len(lines) == 1, lines
    assert "data.x: skipped 5 path(s) that are not regular files" in lines[0]
    for part in ("s-0.tar (FIFO)", "s-00.tar (directory)", "s-zero.tar (character device)"):
        assert part in lines[0]
    assert "/dev/null (character device)" in lines[0]


def test_nothing_regular_left_is_the_one_line_error(tmp_path):
    os.mkfifo(tmp_path / "a.tar")
    (tmp_path / "b.tar").mkdir()
    with pytest.raises(DataError, match=r"matched no regular file \(only .*a.tar \(FIFO\)"):
        resolve_shards(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match=r"matched no regular file \(only .*b.tar \(directory"):
        resolve_shards(str(tmp_path / "b.tar"))
    with pytest.raises(DataError, match="matched no file$"):
        resolve_shards(str(tmp_path / "c-{0..3}.tar"))


def _returns_soon(fn, fifo, timeout=10.0):
    """``fn()`` in a thread; if it is still blocked after ``timeout`` s, the FIFO is opened for
    writing (which releases a blocked reader) and the test fails."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return out[0]


def test_a_fifo_at_open_time_is_an_unreadable_shard_never_a_block(tmp_path):
    """A shard swapped for a FIFO after the listing (or a device): counted, never waited on."""
    fifo = tmp_path / "s.tar"
    os.mkfifo(fifo)
    faults = Faults()
    got = _returns_soon(lambda: list(tar_samples(str(fifo), faults)), fifo)
    assert got == [] and faults.counts["unreadable_shard"] == 1
    got = list(tar_samples("/dev/zero", faults))
    assert got == [] and faults.counts["unreadable_shard"] == 2
    assert _returns_soon(lambda: first_sample([str(fifo)]), fifo) is None


# ---- 2. heterogeneous samples ----------------------------------------------------------


def test_a_batch_of_samples_with_and_without_a_caption_collates():
    items = [
        {"view1": torch.zeros(1, 4, 4, dtype=torch.uint8), "label": 1, "caption": "a one"},
        {"view1": torch.ones(1, 4, 4, dtype=torch.uint8), "label": 2},
        {"view1": torch.ones(1, 4, 4, dtype=torch.uint8), "label": 3, "caption": "a three"},
    ]
    items[0]["tokens"] = items[2]["tokens"] = torch.tensor([1, 2])
    out = collate(items)
    assert out["view1"].shape == (3, 1, 4, 4) and out["label"].tolist() == [1, 2, 3]
    assert out["caption"] == ["a one", None, "a three"]
    assert "tokens" not in out  # cannot be stacked for the batch: left out


def test_the_loader_batches_samples_with_and_without_captions(tmp_path):
    """The project's writer leaves out ``txt`` for an empty caption: such samples share batches
    with captioned ones (SimCLR does not need captions)."""
    _shard(tmp_path / "s-0.tar", 16, caption=lambda i: None if i % 3 == 1 else f"c {i}")
    cfg = DataConfig(train_shards=str(tmp_path / "s-*.tar"), image_size=8, num_workers=1)
    loader = train_loader(cfg, AugmentConfig(), 8, seed=0, rank=0, world=1)
    batches = list(loader.iter_epoch())
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == 16 and captions.count(None) == 5
    assert sum(loader.faults().values()) == 0


# ---- 2. PIL modes ----------------------------------------------------------------------


def _decoded(data: bytes, channels: int, size: int = 12) -> np.ndarray:
    dec = decode_sample({"png": data}, 10**8, require_caption=False)
    return resize_view(dec.image, size, channels).permute(1, 2, 0).numpy().astype(int)


def test_16_bit_png_is_scaled_not_clipped():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, (12, 12), dtype=np.uint16)
    data = _png(Image.fromarray(raw))
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # a real 16-bit PNG
    ref = np.round(raw / 257.0).astype(int)
    for channels in (1, 3):
        got = _decoded(data, channels)
        assert np.abs(got - ref[:, :, None]).max() <= 1, channels


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_other_high_depth_modes_are_scaled(mode):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 65536, (12, 12)).astype(np.float64)
    if mode == "I;16B":
        im = Image.frombytes(mode, (12, 12), raw.astype(">u2").tobytes())
        ref = raw / 257
    elif mode == "I":
        im = Image.fromarray(raw.astype(np.int32))
        ref = raw / 257
    else:  # floats in [0, 1]
        im = Image.fromarray((raw / 65535).astype(np.float32))
        ref = raw / 65535 * 255
    assert im.mode == mode
    got = resize_view(im, 12, 1)[0].numpy().astype(int)
    assert np.abs(got - np.round(ref)).max() <= 1


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + 255 * (1 - a))


def test_transparent_pixels_are_composited_on_white():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    ref = _on_white(rgba[..., :3].astype(np.float64), rgba[..., 3])
    got = _decoded(_png(Image.fromarray(rgba, "RGBA")), 3)
    assert np.abs(got - ref).max() <= 1
    la = rgba[..., [0, 3]]
    ref = _on_white(la[..., :1].astype(np.float64), la[..., 1])
    got = _decoded(_png(Image.fromarray(la, "LA")), 1)
    assert np.abs(got - ref).max() <= 1
    # a palette image whose index 0 is transparent: those pixels white, the others their colour
    idx = rng.integers(0, 4, (12, 12), dtype=np.uint8)
    palette = [0, 0, 0, 200, 10, 10, 10, 200, 10, 10, 10, 200]
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    got = _decoded(_png(p, transparency=0), 3)
    colours = np.array(palette).reshape(4, 3)
    ref = np.where((idx == 0)[..., None], 255, colours[idx])
    assert np.abs(got - ref).max() <= 1


def test_bilevel_and_cmyk_decode_to_their_colours():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2, (12, 12)).astype(bool)
    got = _decoded(_png(Image.fromarray(bits)), 1)
    assert np.array_equal(got[..., 0], np.where(bits, 255, 0))
    cmyk = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, "TIFF")
    got = resize_view(Image.open(io.BytesIO(buf.getvalue())), 12, 3).permute(1, 2, 0).numpy()
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    ref = (255 - c) * (255 - k) / 255  # the usual profile-free CMYK -> RGB
    assert np.abs(got.astype(int) - ref).max() <= 1


# ---- 2. EXIF orientation ---------------------------------------------------------------


def _oriented_jpeg(orientation: int, w: int = 40, h: int = 24) -> bytes:
    """A JPEG of a w x h image whose EXIF says ``orientation``."""
    rng = np.random.default_rng(orientation)
    arr = np.kron(rng.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_exif_transpose(orientation):
    data = _oriented_jpeg(orientation)
    ref_im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    dec = decode_sample({"jpg": data}, 10**8, require_caption=False)
    got = resize_view(dec.image, 16, 3)
    assert torch.equal(got, resize_view(ref_im, 16, 3))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_training_crops_are_drawn_in_the_oriented_image(orientation):
    """Crop geometry is sampled from the header size before the pixels are decoded: the views
    of an oriented JPEG are those of its transposed image (the same crops, the same pixels)."""
    data = _oriented_jpeg(orientation, 80, 48)
    stream = ReaderStream(
        [Source(("x",))],
        DataConfig(image_size=32, channels=3),  # crops too small for a JPEG draft
        AugmentConfig(rotation_deg=0, translate=0),
        8,
        seed=0,
        rank=0,
        world=1,
    )
    reader = Reader(0, 1, 0, 1)
    dec = decode_sample({"jpg": data}, 10**8, require_caption=False)
    ref = decode_sample({"jpg": data}, 10**8, require_caption=False)
    ref.image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    for pos in range(4):
        got, want = stream.views(dec, reader, 0, pos), stream.views(ref, reader, 0, pos)
        assert torch.equal(got["view1"], want["view1"]) and torch.equal(got["view2"], want["view2"])
        dec = decode_sample({"jpg": data}, 10**8, require_caption=False)


def test_evaluation_reads_odd_images_right_too(tmp_path):
    raw = np.full((12, 12), 40000, dtype=np.uint16)
    _shard(tmp_path / "e-0.tar", 3, image=lambda i: _png(Image.fromarray(raw)))
    with wds.TarWriter(str(tmp_path / "e-1.tar")) as w:
        w.write({"__key__": "x", "jpg": _oriented_jpeg(6), "txt": "rotated"})
    urls = resolve_shards(str(tmp_path / "e-*.tar"))
    images, _, captions = read_captioned(urls, DataConfig(channels=1, mean=[0], std=[1]))
    assert captions == ["caption 0", "caption 1", "caption 2", "rotated"]
    assert torch.allclose(images[:3], torch.full_like(images[:3], round(40000 / 257) / 255))
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(_oriented_jpeg(6))))
    assert torch.equal((images[3] * 255).round().to(torch.uint8), resize_view(ref, 16, 1))


# ---- 3. remote retries: the keys ------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("remote_retries", -1), ("remote_backoff_s", -0.5)])
def test_remote_retry_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        config_from_dict({"data": {key: value}})
    cfg = config_from_dict({"data": {"remote_retries": 0, "remote_backoff_s": 0.1}})
    assert retry_of(cfg.data) == Retry(0, 0.1)
