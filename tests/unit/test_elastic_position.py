"""Shard sizes for the elastic position: what tario.tar_samples yields, truncated shards too."""

import io
import tarfile

import pytest

from dist_contrast.data.position import shard_size
from dist_contrast.data.tario import Faults, tar_samples


def _shard(path, n, keep=0):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", b"x" * 700), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if keep:
        path.write_bytes(path.read_bytes()[:keep])
    return str(path)


SAMPLE = 512 + 1024 + 512 + 512  # two headers, 700 bytes padded, 1 byte padded


@pytest.mark.parametrize(
    ("keep", "want"),
    [
        (0, 5),  # whole
        (5 * SAMPLE, 5),  # no end-of-archive blocks
        (4 * SAMPLE + 512 + 300, 4),  # inside the last image
        (4 * SAMPLE + 1536 + 100, 5),  # inside the last header: read as the end
        (2 * SAMPLE + 512 + 1024 + 512, 2),  # inside the last label's data
    ],
)
def test_shard_size_counts_what_the_reader_yields(tmp_path, keep, want):
    url = _shard(tmp_path / "a.tar", 5, keep)
    assert sum(1 for _ in tar_samples(url, Faults(muted=True))) == want
    assert shard_size(url) == want
