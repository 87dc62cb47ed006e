"""What the tests of tests/gpu share: the device they run on, their marks, a process group of
one rank, and the helpers of other test modules they reuse.

The tests compare the CUDA path with the CPU one. Where no CUDA device is present they skip,
with the reason; ``DC_GPU_TEST_DEVICE=cpu`` runs them on the CPU instead (CPU against CPU: the
tests check themselves, as ``bench/device_check.sh --dry-run`` does), except those that only
CUDA can run (SyncBatchNorm, fp16 with DeepSpeed's loss scaler), which then skip.

(Not a conftest.py: a second conftest module would replace ``tests/conftest.py`` under the
name ``conftest`` that the other test modules import.)
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dist_contrast.distributed import free_port

TESTS = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("DC_GPU_TEST_DEVICE", "cuda"))
CUDA = torch.cuda.is_available()
NO_DEVICE = (
    "no CUDA device (torch.cuda.is_available() is false): bench/device_check.sh runs these on "
    "a GPU machine; DC_GPU_TEST_DEVICE=cpu runs them on the CPU"
)

# every module of tests/gpu: pytestmark = MARKS
MARKS = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type == "cuda" and not CUDA, reason=NO_DEVICE)]
# a test only CUDA can run, even with DC_GPU_TEST_DEVICE=cpu
cuda_only = pytest.mark.skipif(
    DEVICE.type != "cuda" or not CUDA,
    reason="CUDA only (no CUDA device, or DC_GPU_TEST_DEVICE=cpu)",
)

# fp32 means fp32 here: no TF32 matmuls or convolutions in the comparisons with the CPU
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def reuse(folder: str, name: str) -> ModuleType:
    """``tests/<folder>/<name>.py`` imported under the name pytest gives it (its helpers reused,
    not copied); pytest later collects the same module object."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def one_rank() -> None:
    """A default process group of one rank (NCCL on CUDA, gloo on the CPU), started once per
    process and left to the end: what DeepSpeed and SyncBatchNorm need in one process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", rank=0, world_size=1)
    atexit.register(_destroy)


def _destroy() -> None:  # at exit, unless someone (bench train in the dry run) did already
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def to(tree, device: torch.device | str, dtype: torch.dtype | None = None):
    """Tensors of a (nested) dict, list or tuple on ``device``; floating ones cast to
    ``dtype`` when given."""
    if isinstance(tree, torch.Tensor):
        cast = dtype if dtype is not None and tree.is_floating_point() else tree.dtype
        return tree.to(device, cast)
    if isinstance(tree, dict):
        return {k: to(v, device, dtype) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to(v, device, dtype) for v in tree)
    return tree
