"""Rank-local state of methods built from a config, trained on 2 ranks, resumed on 4 and on 1:
MoCo v2's queue, CLIP's image and text queues and InstDisc's bank, each rank's ``extra_state``
saved to a file as the engine does and every file read by every new rank.
"""

from __future__ import annotations

import torch

from conftest import config_from_dict
from multiproc import run_ranks

QUEUE = 24  # 12 keys per old rank, 6 per rank of 4
BATCH = {0: 5, 1: 3}  # MoCo keys per step and rank: after 3 steps pointers 3 (wrapped) and 9
BANK = 20
INDICES = ([3, 7, 10, 3], [4, 11, 18])


def _configs() -> dict:
    tiny = {"model": {"width": 8, "proj_hidden_dim": 32, "proj_dim": 16}}
    return {
        "moco": config_from_dict(
            {
                **tiny,
                "method": {"name": "moco_v2", "queue_size": QUEUE},
                "loss": {"name": "infonce"},
            }
        ),
        "clip": config_from_dict(
            {
                "model": {"width": 4, "proj_dim": 8},
                "data": {"image_size": 8, "tokenizer": "bytes", "require_caption": True},
                "text": {"width": 16, "layers": 1, "heads": 2},
                "method": {"name": "clip", "queues": True, "queue_size": QUEUE},
                "loss": {"name": "clip"},
            }
        ),
        "instdisc": config_from_dict(
            {
                **tiny,
                "method": {"name": "instdisc", "bank_size": BANK, "bank_negatives": 5},
                "loss": {"name": "nce"},
            }
        ),
    }


def _methods() -> dict:
    from dist_contrast.methods import build_method

    torch.manual_seed(0)
    return {name: build_method(cfg) for name, cfg in _configs().items()}


def _train_old(rank, world, out):
    """Two ranks: MoCo v2 steps (keys of uneven batches), keys enqueued into CLIP's queues,
    InstDisc steps (collective bank updates, Z estimated). Saves each method's extra_state;
    returns the rows each queue shard holds, oldest first, from the history of what it got."""
    from dist_contrast.losses.kernels.numerics import normalize

    methods = _methods()
    moco, clip, instdisc = methods["moco"], methods["clip"], methods["instdisc"]
    history = {"moco": list(moco.queue.keys.clone())}
    history["image"] = list(clip.queues.image_queue.keys.clone())
    history["text"] = list(clip.queues.text_queue.keys.clone())
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 4):
        n = BATCH[rank]
        views = {f"view{v}": torch.randn(n, 1, 16, 16, generator=g) for v in (1, 2)}
        emb = moco.embed(views)
        moco.loss(emb, views).loss.backward()
        moco.on_step_end(step, 10)
        history["moco"] += list(normalize(emb["k"].detach()))
        for name in ("image", "text"):
            keys = torch.randn(n + 1, 8, generator=g)
            getattr(clip.queues, f"{name}_queue").enqueue(keys)
            history[name] += list(normalize(keys))
        clip.step = step
        index = torch.tensor(INDICES[rank])
        batch = {"view1": torch.randn(len(index), 1, 16, 16, generator=g), "index": index}
        instdisc(batch).loss.backward()
        instdisc.on_step_end(step, 10)
    torch.save({name: m.extra_state() for name, m in methods.items()}, out / f"rank_{rank}.pt")
    shard = QUEUE // world
    return {name: torch.stack(rows[-shard:]) for name, rows in history.items()}


def _resume_new(rank, world, out, old_world):
    methods = _methods()
    saved = [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(old_world)]
    said = {
        name: m.load_extra_state_elastic([s[name] for s in saved]) for name, m in methods.items()
    }
    clip = methods["clip"]
    queues = {
        "moco": methods["moco"].queue,
        "image": clip.queues.image_queue,
        "text": clip.queues.text_queue,
    }
    assert all(q.ptr == 0 and q.world == world and q.rank == rank for q in queues.values())
    steps = (methods["moco"].step, clip.step)
    bank = methods["instdisc"].bank
    return said, steps, {n: q.keys.clone() for n, q in queues.items()}, (bank.rows, float(bank.z))


def test_queues_and_bank_move_from_2_ranks_to_4_and_to_1(tmp_path):
    old = run_ranks(_train_old, 2, tmp_path)
    # the old queues in their global order by age: row a * 2 + r is age a of rank r
    order = {
        name: torch.stack([old[r][name] for r in range(2)], 1).flatten(0, 1) for name in old[0]
    }
    saved = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=False) for r in range(2)]
    assert [s["moco"]["queue"]["ptr"] for s in saved] == [3, 9]
    bank = torch.empty(BANK, 16)
    for r in range(2):
        bank[r::2] = saved[r]["instdisc"]["bank"]["rows"]
    z = saved[0]["instdisc"]["bank"]["z"]
    assert z > 0

    for world in (4, 1):
        new = run_ranks(_resume_new, world, tmp_path, 2)
        for rank, (said, steps, _, new_bank) in enumerate(new):
            assert said == {
                "moco": ["queue 24 keys re-sharded"],
                "clip": ["image/text queues 2 x 24 keys re-sharded"],
                "instdisc": ["bank 20 rows re-routed"],
            }
            assert steps == (3, 3)
            assert torch.equal(new_bank[0], bank[rank::world]) and new_bank[1] == z
        for name, reference in order.items():
            union = torch.empty_like(reference)
            for rank, (_, _, keys, _) in enumerate(new):
                union[rank::world] = keys[name]  # slot s of rank r: row s * W' + r
            assert torch.equal(union, reference), name
