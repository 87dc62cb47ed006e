"""``dist-contrast`` with a fault planted on one rank, for the tests of how a run ends.

    PLANT=raise:RANK:STEP  python planted.py train --config ...   (under torchrun)

``raise``: ``Trainer.train_step`` raises RuntimeError on rank RANK at step STEP (1-based), the
kind of unexpected exception the CLI does not treat as a user error. Everything else is the
real CLI, launcher, DeepSpeed and loader.
"""

from __future__ import annotations

import os
import sys

from dist_contrast import cli
from dist_contrast.train import engine


def plant(spec: str) -> None:
    kind, rank, step = spec.split(":")
    if kind != "raise":
        raise SystemExit(f"planted.py: unknown fault {kind!r}")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    original = engine.Trainer.train_step

    def train_step(self, batch):
        if self.step + 1 == int(step):
            raise RuntimeError(f"planted fault on rank {rank} at step {step}")
        return original(self, batch)

    engine.Trainer.train_step = train_step


if __name__ == "__main__":
    plant(os.environ["PLANT"])
    sys.exit(cli.main())
