"""Lets torchvision's PyPI wheel import beside a CPU-only torch, in the open_clip environment
only (``bench/open_clip_env.sh`` copies this file into that environment's site-packages as
``_dc_open_clip_fix.py``, with a ``.pth`` line that calls :func:`install` at start-up).

Why: torchvision 0.28.0's wheel is built against torch's CUDA build; its operator library
(``torchvision/_C.so``) needs ``libc10_cuda.so``, which the CPU torch 2.13.0 wheel lacks, so it
does not load and ``torchvision::nms`` and ``torchvision::qnms`` are never defined. torchvision
then fails on import at ``torch.library.register_fake("torchvision::nms")`` in
``_meta_registrations.py`` ("operator torchvision::nms does not exist"). open_clip needs only
torchvision's transforms, not those detection operators: defining the two schemas (without any
kernel) before torchvision is imported lets the fake registrations succeed. Calling
``torchvision.ops.nms`` still fails there, as it would with the library missing.

The hook costs nothing until ``torchvision`` is imported (torch is imported then, not at
start-up). Nothing here is imported by dist-contrast's own environment.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = []  # the torch.library.Library that holds the definitions (freed: undefined again)


def define_missing() -> list[str]:
    """Define each operator of :data:`SCHEMAS` that torch does not know; the names defined."""
    import torch

    defined = []
    for name, schema in SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            continue  # torchvision's own library loaded (a CUDA torch): nothing to do
        except RuntimeError:
            pass
        if not _LIBRARY:
            _LIBRARY.append(torch.library.Library("torchvision", "FRAGMENT"))
        _LIBRARY[0].define(schema)
        defined.append(name)
    return defined


class _BeforeTorchvision(MetaPathFinder):
    """Runs :func:`define_missing` once, when ``torchvision`` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing()
        return None  # the ordinary finders import it


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (the ``.pth`` line calls this)."""
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
