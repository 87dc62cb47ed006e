"""Accelerator selection that must happen before DeepSpeed is imported."""

import os


def configure_accelerator() -> str:
    """Set ``DS_ACCELERATOR=cpu`` unless CUDA is usable or the user chose one; return it."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")
