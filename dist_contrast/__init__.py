"""dist-contrast: distributed contrastive pretraining.

Importing the package sets ``DS_ACCELERATOR=cpu`` when no CUDA device is present, before any
module imports DeepSpeed, so the same code runs on a laptop (gloo) and on GPU clusters (NCCL).
"""

from dist_contrast.distributed import configure_accelerator

configure_accelerator()

__version__ = "0.1.0"
