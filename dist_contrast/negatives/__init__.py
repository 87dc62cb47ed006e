"""Where negatives come from beyond the batch: sharded MoCo queue, memory bank, tiled softmax."""

from dist_contrast.losses.kernels.dlse import (
    combine_logsumexp,
    combine_sum,
    distributed_logsumexp,
    local_logsumexp,
)
from dist_contrast.losses.kernels.tiled import tiled_cross_entropy, tiled_logsumexp
from dist_contrast.negatives.bank import MemoryBank, bank_loss, estimate_bank_z
from dist_contrast.negatives.queue import ShardedQueue, queue_info_nce

__all__ = [
    "MemoryBank",
    "ShardedQueue",
    "bank_loss",
    "combine_logsumexp",
    "combine_sum",
    "distributed_logsumexp",
    "estimate_bank_z",
    "local_logsumexp",
    "queue_info_nce",
    "tiled_cross_entropy",
    "tiled_logsumexp",
]
