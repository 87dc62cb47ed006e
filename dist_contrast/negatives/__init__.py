"""Where negatives come from beyond the batch: sharded MoCo queue, memory bank, tiled softmax."""
