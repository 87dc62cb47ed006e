"""Optional formats of an encoder tower: TorchScript (traced) and ONNX.

Both are traced on an example input with a dynamic batch dimension, then checked against the
module on a batch of another size; an artefact that does not reproduce the module is an error,
not a file left behind.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dist_contrast.export.layout import ONNX, TORCHSCRIPT, ExportError

TOLERANCE = 1e-4  # max |difference| relative to max |output|


def _other_batch(x: torch.Tensor) -> torch.Tensor:
    """The example with one more row (the first repeated): a batch size the trace never saw."""
    return torch.cat([x, x[:1]])


def _check(name: str, fmt: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
    if got.shape != want.shape or err > TOLERANCE:
        raise ExportError(
            f"{fmt} export of tower '{name}' does not reproduce the module "
            f"(shape {tuple(got.shape)} vs {tuple(want.shape)}, relative error {err:.2e})"
        )


@torch.no_grad()
def write_torchscript(module: nn.Module, x: torch.Tensor, folder: Path, name: str) -> str:
    """``folder/model.pt``: ``torch.jit.load`` gives a module taking the same inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace deprecation, tensor-to-bool in torch's checks
        traced = torch.jit.trace(module, x, check_trace=False)
    path = folder / TORCHSCRIPT
    traced.save(str(path))
    y = _other_batch(x)
    _check(name, "TorchScript", torch.jit.load(str(path))(y), module(y))
    return f"{name}/{TORCHSCRIPT}"


@torch.no_grad()
def write_onnx(module: nn.Module, x: torch.Tensor, folder: Path, name: str, kind: str) -> str:
    """``folder/model.onnx`` with input ``images`` (or ``tokens``) and output ``features``,
    the batch dimension dynamic (the TorchScript-based exporter, ``dynamo=False``)."""
    path = folder / ONNX
    inp = "images" if kind == "image" else "tokens"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                input_names=[inp],
                output_names=["features"],
                dynamic_axes={inp: {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
            )
    except ImportError as exc:
        raise ExportError(f"--onnx needs the onnx package ({exc}): pip install onnx") from None
    _check_onnx(path, name, inp, module, _other_batch(x))
    return f"{name}/{ONNX}"


def _check_onnx(path: Path, name: str, inp: str, module: nn.Module, y: torch.Tensor) -> None:
    """Run the file in onnxruntime when it is installed (a test dependency, not a runtime one)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {inp: y.numpy()})[0])
    _check(name, "ONNX", got, module(y))
