"""Shard writers (``dist-contrast shards``): the built-in digits, an image folder, a CSV of
path + caption. Each writes into a staging folder and moves the finished shards in place with
``counts.json`` last, so an interrupted write leaves nothing half-done."""

from dist_contrast.data.write.digits import DIGIT_TEMPLATES, write_digits
from dist_contrast.data.write.plan import ShardOptions
from dist_contrast.data.write.shards import WriteResult, write_csv, write_folder

__all__ = [
    "DIGIT_TEMPLATES",
    "ShardOptions",
    "WriteResult",
    "write_csv",
    "write_digits",
    "write_folder",
]
