"""Past the 4-rank tests: CLIP with momentum queues and SimCLR on W = 8 and 16 ranks (and 32
with ``-m ranks32``, opt-in) with the same global batch as one process, in float32:

- the loss and every parameter's gradient of the first step equal the one-process run;
- each rank holds queue_size / W queue rows (queue bytes per rank fall as 1 / W), and the
  keys the shards enqueue are, in rank order, the keys one process enqueues;
- each query sees the global batch minus itself plus the whole queue: the method's
  ``negatives_per_query`` (what the README and the logs report) is that, and the loss equal to
  one process's shows that every rank scores them all (with fewer, it differs: the gather-off
  test of test_simclr_equivalence.py).

float32 tolerance: the loss within 2e-6 relative; a gradient element within
1e-5 * max|g| + 1e-7 of the one-process one. Measured (the same global batch of 64 split 8, 16
and 32 ways): the loss within 1.2e-7 relative, gradients within 1.7e-6 * max|g|.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_contrast.data.tokenizer import ByteTokenizer
from dist_contrast.methods import build_method

from conftest import config_from_dict
from multiproc import run_ranks

GLOBAL_B = 64  # 2 samples per rank at W = 32
QUEUE = 128  # 4 rows per rank at W = 32
DIM = 8  # projection width: a queue row is DIM float32
WORLDS = [8, 16, pytest.param(32, marks=pytest.mark.ranks32)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _cfg(method: str):
    tree = {
        "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": DIM},
        "data": {"image_size": 8},
    }
    if method == "clip":
        tree["data"].update(tokenizer="bytes", require_caption=True, views=1)
        tree["text"] = {"width": 16, "layers": 1, "heads": 2}
        tree["method"] = {"name": "clip", "queues": True, "queue_size": QUEUE}
        tree["loss"] = {"name": "clip", "temperature": 0.07}
    else:
        tree["loss"] = {"temperature": 0.3}
    return config_from_dict(tree)


def _batch(method: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if method == "clip":
        tok = ByteTokenizer(32)
        return {
            "view1": torch.randn(GLOBAL_B, 1, 8, 8, generator=g),
            "tokens": tok([f"a {WORDS[i % 10]} {i}" for i in range(GLOBAL_B)]),
        }
    return {
        "view1": torch.randn(GLOBAL_B, 1, 8, 8, generator=g),
        "view2": torch.randn(GLOBAL_B, 1, 8, 8, generator=g),
    }


def _step(rank: int, world: int, method_name: str) -> dict:
    torch.manual_seed(0)
    method = build_method(_cfg(method_name))
    batch = _batch(method_name)
    per = GLOBAL_B // world
    mine = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    out = method(mine)
    out.loss.backward()
    loss = out.loss.detach().clone()
    if world > 1:  # what DeepSpeed does: the gradients and the logged loss averaged over ranks
        for p in method.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        dist.all_reduce(loss)
        loss /= world
    result = {
        "loss": float(loss),
        "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
    }
    if method_name == "clip":
        q = method.queues
        result["negatives_per_query"] = method.negatives_per_query(per, world)
        result["queue_bytes"] = sum(
            s.keys.numel() * s.keys.element_size() for s in (q.image_queue, q.text_queue)
        )
        result["queue_rows"] = (q.image_queue.keys.shape[0], q.text_queue.keys.shape[0])
        method.on_step_end(1, 10)  # the momentum update and this step's enqueue
        result["queues_after"] = (q.image_queue.keys.clone(), q.text_queue.keys.clone())
    return result


def _both(rank: int, world: int) -> dict:
    """Both methods on one set of processes (one start-up of W processes, not two)."""
    return {m: _step(rank, world, m) for m in ("clip", "simclr")}


def _assert_grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        tol = 1e-5 * float(g.abs().max()) + 1e-7
        err = float((got[name] - g).abs().max())
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def one_process():
    return {m: _step(0, 1, m) for m in ("clip", "simclr")}


@pytest.mark.parametrize("world", WORLDS)
def test_first_step_on_w_ranks_equals_one_process(one_process, world):
    ranks = run_ranks(_both, world, timeout=300)
    for method_name, ref in one_process.items():
        for r in ranks:
            assert r[method_name]["loss"] == pytest.approx(ref["loss"], rel=2e-6), method_name
            _assert_grads_close(r[method_name]["grads"], ref["grads"])
    ref, ranks = one_process["clip"], [r["clip"] for r in ranks]
    # queue memory per rank: queue_size / W rows of each queue, DIM float32 each
    for r in ranks:
        assert r["queue_rows"] == (QUEUE // world, QUEUE // world)
        assert r["queue_bytes"] == 2 * (QUEUE // world) * DIM * 4
    assert ranks[0]["queue_bytes"] * world == ref["queue_bytes"]
    # the step's enqueue: each shard's next rows hold its rank's momentum keys, which in rank
    # order are the keys one process enqueues for the global batch (the older rows each keeps
    # differ until the queue has turned over once: every shard evicts its own oldest)
    per = GLOBAL_B // world
    for i in range(2):
        new_rows = torch.cat([r["queues_after"][i][:per] for r in ranks])
        torch.testing.assert_close(
            new_rows, ref["queues_after"][i][:GLOBAL_B], rtol=1e-5, atol=1e-6
        )
    # negatives per query: the global batch but the positive, plus the whole queue
    want = GLOBAL_B - 1 + QUEUE
    assert all(r["negatives_per_query"] == want for r in ranks)
    assert ref["negatives_per_query"] == want
