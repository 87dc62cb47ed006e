"""Accelerator selection that must happen before DeepSpeed is imported."""

import os
import sys


def configure_accelerator() -> str:
    """Set ``DS_ACCELERATOR=cpu`` unless CUDA is usable or the user chose one; return it.

    Also, in a virtual environment, DeepSpeed's compiled ops (the CPU shared-memory comm op) go
    to ``<venv>/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` is set: the default cache in
    the home directory is shared by every environment, so two clones rebuild it in turn, and a
    build killed half-way leaves a lock that makes every later start wait forever. The venv's
    ``bin`` goes first on ``PATH`` so that its ninja, not a system one, builds them."""
    venv = sys.prefix != sys.base_prefix
    if venv and "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if venv:  # the venv's ninja builds those ops whether or not the venv was activated: a
        # system ninja of another version reads the build log differently and rebuilds each time
        bin_dir = os.path.join(sys.prefix, "bin")
        path = os.environ.get("PATH", "").split(os.pathsep)
        if path[:1] != [bin_dir]:
            os.environ["PATH"] = os.pathsep.join([bin_dir, *[d for d in path if d != bin_dir]])
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")
