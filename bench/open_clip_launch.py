"""Runs open_clip_train with a model config written by ``bench/vs_open_clip.py``, in the
open_clip environment only (``make open-clip-env``), one process per rank under torchrun:

    torchrun --nproc_per_node 2 bench/open_clip_launch.py MODEL.json ARGS.json

open_clip_train takes a model by name from its registry: ``open_clip.add_model_config`` adds
MODEL.json (name: its file stem), then ``open_clip_train.main.main`` runs with the arguments
listed in ARGS.json (a JSON list of strings: on torchrun's command line, open_clip's ``--logs``
would be taken for an abbreviation of torchrun's ``--logs-specs``).

open_clip_train 3.3.0 wraps the model in ``DistributedDataParallel(model, device_ids=[device])``
whatever the device; torch refuses ``device_ids`` for a CPU module ("device_ids and output_device
arguments only work with single-device/multiple-device GPU modules or CPU modules"), so its
distributed training does not start on CPU. :func:`cpu_ddp` drops CPU ``device_ids`` (what DDP
wants for a CPU module; nothing else changes), for this launcher's process only.

Not a benchmark of its own (no ``main``): dist-contrast's environment never imports open_clip.
"""

from __future__ import annotations

import sys


def cpu_ddp() -> None:
    """``torch.nn.parallel.DistributedDataParallel`` without ``device_ids`` for CPU devices."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class CPUDistributedDataParallel(DistributedDataParallel):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CPUDistributedDataParallel


def launch(argv: list[str]) -> None:
    import json

    import open_clip
    from open_clip_train import main as train_main

    cpu_ddp()
    model_json, args_json = argv
    open_clip.add_model_config(model_json)
    with open(args_json) as f:
        train_main.main(json.load(f))


if __name__ == "__main__":
    launch(sys.argv[1:])
