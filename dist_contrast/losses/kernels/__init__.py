"""Numerical kernels of the objectives: fp32 numerics, the tiled softmax (logits never whole)
and the distributed log-sum-exp over rank-sharded columns (queue, memory bank)."""
