"""Every use of DeepSpeed's internals, in one place.

DeepSpeed's public API (``deepspeed.initialize``, ``engine.save_checkpoint`` /
``load_checkpoint``) is used where it belongs; what is not public, or not safe as DeepSpeed
ships it, goes through this module:

- its loaders unpickle checkpoint files with ``weights_only=False`` (a file of a run folder
  could run code when loaded): :func:`safe_loads` makes every ``torch.load`` inside it a
  ``weights_only=True`` load that accepts only tensors, plain data and the few DeepSpeed
  classes its checkpoints hold (:data:`SAFE_GLOBALS`); anything else is refused in one line
  naming the file;
- the universal checkpoint: the converter (``ds_to_universal.main`` called with the namespace
  its command line would build) and the engine's ``load_universal_checkpoint`` flag, read at
  load time only (:func:`convert_universal`, :func:`load_universal`);
- consolidation of ZeRO partitions without an engine (``zero_to_fp32``);
- validation of a DeepSpeed config dict without starting an engine (:func:`check_config`), and
  the ZeRO defaults the planner (:mod:`dist_contrast.train.plan`) counts with
  (:data:`ZERO_DEFAULTS`);
- its clone of the world process group, kept for the life of the process: stale once the
  default group is destroyed and made again, when it is dropped (:func:`drop_stale_groups`);
- the engine's ``flatten`` (the gradients' all-reduce bucket outside ZeRO-2/3), which on a CPU
  writes into one kept buffer instead of a fresh one each step (:func:`keep_flat_buffer`);
- its communication backend's all-gather into a tensor (ZeRO-1/2's all-gather of the updated
  weights), done by broadcasts on gloo (:func:`gather_by_broadcast_on_gloo`).

These were checked against the DeepSpeed versions of :data:`CHECKED`;
tests/unit/test_trust_checkpoint.py pins them, so an upgrade fails there, in one place, first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_contrast.errors import CheckpointError, ConfigError
from dist_contrast.files import NotRegularFile, open_regular, require_regular

CHECKED = ((0, 19), (0, 19))  # DeepSpeed versions (major, minor) this module was checked with
# DeepSpeed's defaults (its ZeRO config model) for the settings the planner reads, which
# ``deepspeed.raw`` may change
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}


class UnsafeFileError(CheckpointError):
    """A file that holds more than tensors and plain data: damaged, or made to run code."""


def version() -> tuple[int, int]:
    import deepspeed

    major, minor = deepspeed.__version__.split(".")[:2]
    return int(major), int(minor)


def check_version() -> None:
    """One line if the installed DeepSpeed is outside :data:`CHECKED`: its private API may have
    moved (the universal checkpoint, the ZeRO consolidation, the classes its files hold)."""
    low, high = CHECKED
    if not low <= version() <= high:
        import deepspeed

        raise ConfigError(
            f"DeepSpeed {deepspeed.__version__} is installed; dist-contrast's use of its "
            f"internals (dist_contrast/train/deepspeed_api.py) was checked with "
            f"{low[0]}.{low[1]}-{high[0]}.{high[1]}: install deepspeed=={high[0]}.{high[1]}.*"
        )


# ---- loading without running code -----------------------------------------------------------


@functools.cache
def safe_globals() -> list[Any]:
    """What a checkpoint file may hold besides tensors and plain data: DeepSpeed's classes of
    its optimizer states (a namedtuple of fragment addresses, the loss scaler, the ZeRO stage
    enum) and NumPy's array reconstruction (the random-generator state of rank files written
    before they held it as a tensor). None of these runs code when unpickled."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_core = getattr(np, "_core", None) or np.core
    return [
        fragment_address,
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        numpy_core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of one file of a run, checkpoint or export: ``weights_only=True`` with
    :func:`safe_globals`; a file that is not a regular file, holds other objects (code) or
    cannot be read is one :class:`CheckpointError` naming it."""
    return _guarded_load(torch.load, path, map_location=map_location)


def _guarded_load(real_load, f: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs["weights_only"] = True
    kwargs.pop("pickle_module", None)
    name = os.fspath(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", repr(f))
    try:
        opened = _opened(f, mmap=bool(kwargs.get("mmap")))
    except NotRegularFile:
        raise CheckpointError(f"{name}: not a regular file") from None
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    try:
        with opened as handle, torch.serialization.safe_globals(safe_globals()):
            return real_load(handle, *args, **kwargs)
    except pickle.UnpicklingError as exc:
        found = _unsupported(str(exc))
        raise UnsafeFileError(
            f"{name}: refused to load: it holds {found} (only tensors and plain data are "
            "loaded): a damaged or hostile file"
        ) from None
    except CheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError, UnicodeDecodeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{name}: cannot be read ({first[:200]})") from None


def _opened(f: Any, mmap: bool) -> contextlib.AbstractContextManager:
    """What ``torch.load`` is given for ``f``: a path opened here as a regular file (a FIFO
    never blocks it), or for ``mmap`` (which needs the path) checked so and then passed on; a
    file object as it is."""
    if not isinstance(f, str | os.PathLike):
        return contextlib.nullcontext(f)
    if mmap:
        require_regular(f)
        return contextlib.nullcontext(f)
    return open_regular(f)


def _unsupported(message: str) -> str:
    """The global a refused pickle asked for, from torch's message ("Unsupported global:
    GLOBAL posix.system ...")."""
    marker = "GLOBAL "
    if marker in message:
        name = message.split(marker, 1)[1].split()[0].rstrip(".,:")
        return f"the Python object {name}"
    return "objects other than tensors"


@contextlib.contextmanager
def safe_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` (DeepSpeed's own, which pass ``weights_only=False``) is
    :func:`load`. For the code that calls DeepSpeed's loaders."""
    real = torch.load
    guarded = functools.partial(_guarded_load, real)
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = real


# ---- the universal checkpoint ---------------------------------------------------------------


def convert_universal(step_dir: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of ``step_dir`` into ``out/<step_dir.name>``, in this
    process (no pool of workers that could outlive it), its output kept off the console; a
    failure is one :class:`CheckpointError`."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(out / step_dir.name),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # a model without tensor parallelism: none to record
    )
    log = io.StringIO()  # its progress lines and bars: a failure is said in one line
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), safe_loads():
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as exc:  # its asserts and file errors: one line for the user
        raise CheckpointError(
            f"could not convert {step_dir} to a universal checkpoint for another number of "
            f"ranks: {type(exc).__name__}: {exc}"
        ) from None


def load_universal(engine, root: Path, tag: str) -> tuple[str | None, dict | None]:
    """``engine.load_checkpoint`` of the universal checkpoint ``root/tag``. DeepSpeed reads its
    ``checkpoint.load_universal`` setting (a private attribute of the engine's config) at load
    time only: it is set for this load."""
    config = engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        raise CheckpointError(
            "this DeepSpeed has no load_universal_checkpoint setting: resuming on another "
            "number of ranks needs DeepSpeed 0.19 (see dist_contrast/train/deepspeed_api.py)"
        )
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with safe_loads():
            return engine.load_checkpoint(str(root), tag=tag)
    finally:
        config.load_universal_checkpoint = before


def load_checkpoint(engine, root: Path, tag: str) -> tuple[str | None, dict | None]:
    """``engine.load_checkpoint`` with every file loaded by :func:`load`."""
    with safe_loads():
        return engine.load_checkpoint(str(root), tag=tag)


def consolidated_fp32(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO 1-3 checkpoint, gathered from its partitions by DeepSpeed's
    ``zero_to_fp32``, every file loaded by :func:`load`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


class _KeptFlat:
    """``_flatten_dense_tensors`` into a buffer kept between calls, one per size, dtype and
    device (a step flattens the same buckets every time). DeepSpeed's gradient all-reduce
    outside ZeRO-2/3 (``allreduce_bucket``) flattens the gradients, all-reduces the flat tensor
    and copies it back into them before it flattens again, so a kept buffer is never read after
    the next call. On a CPU a fresh flat tensor of a model's size is a fresh ``mmap`` each step,
    and its first-touch page faults cost more than the copy: 21 ms against 4 for 36 MB on the
    development VM (docs/benchmarks.md)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        first = tensors[0]
        key = (sum(t.numel() for t in tensors), first.dtype, first.device)
        buf = self.buffers.get(key)
        if buf is None:
            if len(self.buffers) >= self.keep:
                self.buffers.pop(next(iter(self.buffers)))
            buf = self.buffers[key] = torch.empty(key[0], dtype=key[1], device=key[2])
        return torch.cat([t.reshape(-1) for t in tensors], out=buf)


def keep_flat_buffer(engine: Any) -> None:
    """On a CPU, the gradient buckets flattened into kept buffers (:class:`_KeptFlat`): the
    engine's (its ``flatten`` serves its all-reduce alone), and ZeRO-1/2's in its
    ``allreduce_bucket`` only (its ``flatten`` also builds tensors it keeps, at checkpoint
    loads); each caller of ``allreduce_bucket`` copies the result out before the next call.
    Elsewhere the allocator caches the block already, and keeping it would hold it through the
    next forward; left as it is."""
    if torch.device(engine.device).type != "cpu":
        return
    if hasattr(engine, "flatten"):
        engine.flatten = _KeptFlat()
    zero = engine.optimizer
    if hasattr(zero, "allreduce_bucket") and hasattr(zero, "flatten"):
        zero.allreduce_bucket = functools.partial(
            _with_kept_flat, zero, type(zero).allreduce_bucket, _KeptFlat()
        )


def _with_kept_flat(zero: Any, allreduce_bucket: Any, kept: _KeptFlat, *args, **kwargs) -> Any:
    plain = zero.flatten
    zero.flatten = kept
    try:
        return allreduce_bucket(zero, *args, **kwargs)
    finally:
        zero.flatten = plain


def gather_by_broadcast_on_gloo() -> None:
    """On a gloo world, DeepSpeed's ``all_gather_into_tensor`` (``TorchBackend``'s
    ``all_gather_function``, which ZeRO-1/2 use to all-gather the updated weights each step)
    becomes :func:`dist_contrast.distributed.all_gather_into_tensor`: the same bytes, by one
    broadcast per rank, about 3x faster than gloo's all-gather. Other backends keep theirs."""
    import torch.distributed as dist
    from deepspeed.comm import comm

    from dist_contrast.distributed import all_gather_into_tensor

    backend = comm.cdb
    if backend is None or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    if getattr(backend, "all_gather_function", None) is not None:
        backend.all_gather_function = all_gather_into_tensor


# ---- configuration --------------------------------------------------------------------------


def drop_stale_groups() -> None:
    """DeepSpeed clones the world group once per process (``deepspeed.utils.groups._WORLD_GROUP``)
    and keeps it; after ``destroy_process_group`` and a new ``init_process_group`` (a second run
    in the same process: ``bench train`` run twice, a notebook) the clone is no longer a
    registered group and ``deepspeed.initialize`` fails on it. Drop it then, so DeepSpeed
    clones the live world again; a live clone is kept."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    group = getattr(groups, "_WORLD_GROUP", None)
    if group is None or not dist.is_initialized():
        return
    try:
        dist.get_rank(group)
    except ValueError:  # "... is not registered": made before the default group was destroyed
        groups._WORLD_GROUP = None


def check_config(ds: dict[str, Any], world: int) -> None:
    """DeepSpeed's own config model over ``ds`` (the derived config with ``deepspeed.raw``
    merged in), without an engine: a field it refuses is one :class:`ConfigError`. DeepSpeed
    takes the world size from a process group; the batch sizes are checked here for ``world``
    ranks, then handed to it as they are for one rank."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = copy.deepcopy(ds)
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    train, micro, acc = (ds.get(k) for k in keys)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (train, micro, acc)):
        if train != micro * acc * world:
            raise ConfigError(
                f"deepspeed.raw: train_batch_size {train} != train_micro_batch_size_per_gpu "
                f"{micro} x gradient_accumulation_steps {acc} x {world} rank(s)"
            )
        ds["train_batch_size"] = micro * acc
    try:
        DeepSpeedConfig(ds)
    except Exception as exc:  # pydantic's ValidationError, asserts, type errors
        raise ConfigError(f"deepspeed.raw: DeepSpeed refuses the config: {_said(exc)}") from None


def _said(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "?"
            model = getattr(exc, "title", "")
            return f"{model} {where}: {first.get('msg')}".strip()
        except Exception:  # noqa: BLE001 (fall back to the message)
            pass
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text}"[:300]
