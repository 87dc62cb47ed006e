"""Loading weights into a model exactly: every key present, none extra, every shape equal, and
the first difference named in one line (where the weights come from, the key, both shapes)."""

from __future__ import annotations

import torch
from torch import nn


def load_exact(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    error: type[Exception] = ValueError,
) -> None:
    """Load ``state`` into ``module`` after checking it fits exactly; otherwise raise ``error``
    naming the first key whose shape differs, is missing, or is not expected."""
    own = module.state_dict()
    for key, ref in own.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            raise error(
                f"{where} holds weights of another architecture: '{key}' has shape "
                f"{tuple(state[key].shape)} there, the config's model expects {tuple(ref.shape)}"
            )
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    for keys, what in ((missing, "lacks"), (extra, "has the unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise error(
                f"{where} holds weights of another architecture: it {what} key '{keys[0]}'{more}"
            )
    module.load_state_dict(state, strict=True)
