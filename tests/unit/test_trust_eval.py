"""Evaluation reads odd samples as training does: a JPEG whose header reads but whose pixels
are cut off is skipped and counted, never the end of an evaluation."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from dist_contrast.config import DataConfig
from dist_contrast.data.evalsets import Unit
from dist_contrast.data.tario import Faults
from dist_contrast.eval.stream import _samples


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40 + seed).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_pixels_cut_off_past_the_header_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "val-000000.tar"
    samples = [("a", _jpeg(0)), ("b", _jpeg(1)[:700]), ("c", _jpeg(2))]  # b: header, no pixels
    with tarfile.open(shard, "w") as tar:
        for key, data in samples:
            for ext, payload in (("jpg", data), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    faults = Faults(muted=True)
    data = DataConfig(image_size=16, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    got = list(_samples([(0, Unit("shard", url=str(shard)))], data, False, 0, faults))
    assert [label for _, _, label, _ in got] == [3, 3]
    assert faults.seen == {"corrupt_image": 1}
