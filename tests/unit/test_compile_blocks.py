"""``train.compile``: ZeRO-3 refused in one line; a compiled block with batch norm under
activation checkpointing gives the eager outputs, gradients and running statistics.
(The engine runs: tests/integration/test_compile.py.)"""

import pytest
import torch

from dist_contrast.errors import ConfigError
from dist_contrast.models import SmallResNet, compile_blocks

from conftest import config_from_dict


def test_compile_with_zero3_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"train\.compile.*zero_stage 0-2"):
        config_from_dict({"train": {"compile": True}, "deepspeed": {"zero_stage": 3}})
    assert config_from_dict({"train": {"compile": True}}).train.compile


def test_compiled_blocks_match_eager_with_batch_norm_and_checkpointing():
    """One residual block with batch norm under activation checkpointing, compiled in place:
    the same state-dict keys, the eager outputs and gradients (to rounding), and the running
    statistics updated once per step, not again by the recomputation."""
    torch.manual_seed(0)
    eager = SmallResNet(1, 4, (1,), "batch", checkpointing=True)
    compiled = SmallResNet(1, 4, (1,), "batch", checkpointing=True)
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 1
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(6, 1, 8, 8)
    for model in (eager, compiled):
        for _ in range(2):
            model(x).square().sum().backward()
    for (name, a), b in zip(
        eager.state_dict().items(), compiled.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    assert int(compiled.stages[0].norm1.num_batches_tracked) == 2
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        scale = float(a.grad.abs().max())
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4 * scale)
