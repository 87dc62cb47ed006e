"""MoCo v2 / v3, BYOL and InstDisc: resume with the queue, the momentum encoder under ZeRO-3,
MoCo v3's loss against one process on the global batch, the memory bank's updated rows."""

import json

import pytest
import torch
import torch.nn.functional as F

from dist_contrast.train.checkpoint import load_rank_state

from conftest import config_from_dict, run_torchrun
from multiproc import run_ranks

CONFIG = "configs/moco_v2_digits.yaml"


def _cfg(**sections):
    """A tiny digits-sized config: ResNet-tiny of width 8, 16x16 grey images."""
    tree = {"model": {"width": 8, "proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


def _views(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(n, 1, 16, 16, generator=g),
        "view2": torch.randn(n, 1, 16, 16, generator=g),
    }


# --------------------------------------------------------------------------------------------
# Acceptance: MoCo v2 on 2 ranks, 8 steps straight == 4 steps + resume + 4 steps


def _overrides(digits_dir, run_dir, **extra):
    base = {
        "run.dir": str(run_dir),
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "data.num_workers": 1,
        "train.steps": 8,
        "train.batch_size": 32,
        "train.log_every": 1,
        "train.warmup_steps": 2,
        "checkpoint.every": 4,
        "model.width": 8,
        # batch norm with shuffle-BN: the permutation depends on the step, restored too
        "model.norm": "batch",
        "method.shuffle_bn": "true",
        # 48 keys per rank, 32 enqueued per step: after 4 steps the queue holds keys of
        # steps 3 and 4 and its pointer is at 32 -- a fresh queue would change step 5
        "method.queue_size": 96,
        "logging.wandb": "false",
        "logging.progress": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


@pytest.mark.slow
def test_moco_v2_resume_with_queue_is_exact(digits_dir, tmp_path):
    straight = _overrides(digits_dir, tmp_path, **{"run.name": "a"})
    proc = run_torchrun(2, "train", "--config", CONFIG, *straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, losses = _losses(tmp_path / "a")
    assert steps == list(range(1, 9))

    # The queue shards saved at step 4 hold that run's keys, not the initial random rows.
    for rank in range(2):
        state = load_rank_state(tmp_path / "a" / "checkpoints" / "step_00000004", rank)
        queue = state["method"]["queue"]
        assert queue["ptr"] == (4 * 32) % 48 and queue["world"] == 2 and queue["rank"] == rank
        assert state["method"]["step"] == 4

    half = _overrides(digits_dir, tmp_path, **{"run.name": "b", "train.stop_at": 4})
    assert run_torchrun(2, "train", "--config", CONFIG, *half).returncode == 0
    rest = _overrides(digits_dir, tmp_path, **{"run.name": "b", "checkpoint.resume": "latest"})
    proc = run_torchrun(2, "train", "--config", CONFIG, *rest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "b") == (steps, losses)


# --------------------------------------------------------------------------------------------
# Acceptance: the MoCo key encoder follows the EMA of the query encoder under ZeRO-3


def _zero3_steps(rank, world, steps):
    import deepspeed

    from dist_contrast.methods import build_method
    from dist_contrast.train.setup import deepspeed_config

    cfg = _cfg(
        method={"name": "moco_v2", "queue_size": 64, "momentum": 0.9},
        loss={"name": "infonce"},
        train={"batch_size": 8, "steps": steps},
        # every parameter partitioned, none kept whole on every rank
        deepspeed={
            "zero_stage": 3,
            "raw": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    online = [*method.encoder.parameters(), *method.projector.parameters()]
    target = [*method.target_encoder.parameters(), *method.target_projector.parameters()]
    initial = [p.detach().clone() for p in target]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    engine, *_ = deepspeed.initialize(
        model=method, optimizer=opt, config=deepspeed_config(cfg, world), dist_init_required=False
    )
    assert all(hasattr(p, "ds_tensor") and p.ds_numel > p.ds_tensor.numel() for p in target[:1])

    def whole(params):
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    errors, losses = [], []
    for step in range(1, steps + 1):
        out = engine(_views(8, 100 * step + rank))
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        o, t = whole(online), whole(target)
        engine.module.on_step_end(step, steps)
        expected = [tt * 0.9 + oo * (1 - 0.9) for tt, oo in zip(t, o, strict=True)]
        after = whole(target)
        errors.append(max(float((a - e).abs().max()) for a, e in zip(after, expected, strict=True)))
    moved = max(float((a - b).abs().max()) for a, b in zip(whole(target), initial, strict=True))
    return errors, losses, moved, engine.module.queue.ptr


def test_moco_momentum_encoder_under_zero3():
    results = run_ranks(_zero3_steps, 2, 3)
    for errors, losses, moved, ptr in results:
        assert max(errors) < 1e-6  # the EMA of the consolidated weights, to rounding
        assert all(torch.isfinite(torch.tensor(losses)))
        assert moved > 1e-3  # the key encoder did move
        assert ptr == (3 * 8) % 32  # each rank enqueued its 8 keys per step


# --------------------------------------------------------------------------------------------
# MoCo v3: W ranks equal one process on the global batch


def _naive_moco_v3(method, batch, tau):
    """2 tau (ctr(q1, k2) + ctr(q2, k1)), each a cross-entropy over the whole batch."""

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
        return F.cross_entropy(logits, torch.arange(q.shape[0]))

    q1, q2 = method.online(batch["view1"]), method.online(batch["view2"])
    k1, k2 = method.target(batch["view1"]), method.target(batch["view2"])
    return 2 * tau * (ctr(q1, k2) + ctr(q2, k1))


def _moco_v3_rank(rank, world):
    import torch.distributed as dist

    from dist_contrast.methods import build_method

    torch.set_default_dtype(torch.float64)
    cfg = _cfg(method={"name": "moco_v3", "momentum": 0.5}, loss={"name": "infonce"})
    torch.manual_seed(0)
    method = build_method(cfg)
    with torch.no_grad():  # a target different from the online network
        for p in method.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full = _views(12, 7)
    mine = {k: v[rank * 6 : (rank + 1) * 6] for k, v in full.items()}
    loss = method(mine)
    loss.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in method.encoder.parameters()])
    dist.all_reduce(grads)
    value = torch.tensor([float(loss.loss)])
    dist.all_reduce(value)
    method.zero_grad()
    ref = _naive_moco_v3(method, full, cfg.loss.temperature)
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in method.encoder.parameters()])
    return float(value) / world, float(ref), grads / world, ref_grads


def test_moco_v3_loss_equals_one_process():
    for value, ref, grads, ref_grads in run_ranks(_moco_v3_rank, 2):
        assert value == pytest.approx(ref, rel=1e-12)
        assert torch.allclose(grads, ref_grads, rtol=1e-9, atol=1e-12)
        assert ref_grads.abs().max() > 1e-6


# --------------------------------------------------------------------------------------------
# InstDisc: the bank rows of the step's samples, and only those, follow the momentum update

INDICES = ([3, 7, 10, 3], [4, 11, 18])  # per rank; 3 twice: its last occurrence wins


def _instdisc_rank(rank, world):
    from dist_contrast.methods import build_method

    cfg = _cfg(
        method={"name": "instdisc", "bank_size": 20, "bank_negatives": 5, "bank_momentum": 0.5},
        loss={"name": "nce", "temperature": 0.07},
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    before = method.bank.rows.clone()
    index = torch.tensor(INDICES[rank])
    batch = {**_views(len(index), 50 + rank), "index": index}
    out = method(batch)
    out.loss.backward()
    features = method.embed(batch)["f"].detach()  # the same weights: the same features
    method.on_step_end(1, 10)
    return (
        torch.arange(rank, 20, world),
        before,
        method.bank.rows.clone(),
        features,
        float(out.loss),
    )


def test_instdisc_bank_updates_the_rows_of_the_batch():
    results = run_ranks(_instdisc_rank, 2)
    new = {}
    for rank, (_, _, _, features, loss) in enumerate(results):
        assert torch.isfinite(torch.tensor(loss))
        for i, f in zip(INDICES[rank], features, strict=True):
            new[i] = F.normalize(f, dim=0)  # later occurrences overwrite earlier ones
    for rank, (owned, before, after, _, _) in enumerate(results):
        assert owned.tolist() == list(range(rank, 20, 2))  # sample i on rank i % 2
        for slot, i in enumerate(owned.tolist()):
            if i in new:
                want = F.normalize(0.5 * before[slot] + 0.5 * new[i], dim=0)
                assert torch.allclose(after[slot], want, atol=1e-6), i
            else:
                assert torch.equal(after[slot], before[slot]), i


# InstDisc on 2 ranks == one process: sample i scored against its own bank row (fetched from
# rank i % 2) and the whole bank; gradients into the features only (the bank has none)


def _naive_instdisc(f, index, rows, tau):
    """Cross-entropy of each feature's own row among every bank row (InstDisc's softmax over
    all n rows, the own row once)."""
    f = F.normalize(f, dim=1)
    return F.cross_entropy(f @ rows.T / tau, index.to(torch.long))


def _instdisc_softmax_rank(rank, world):
    import torch.distributed as dist

    from dist_contrast.methods import build_method
    from dist_contrast.negatives import MemoryBank

    torch.set_default_dtype(torch.float64)
    cfg = _cfg(
        method={"name": "instdisc", "bank_size": 20, "bank_negatives": 0},
        loss={"name": "infonce", "temperature": 0.07},
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    index = [3, 7, 10, 12, 4, 11, 18, 19]
    full = {**_views(8, 9), "index": torch.tensor(index)}
    mine = {k: v[rank * 4 : (rank + 1) * 4] for k, v in full.items()}
    out = method(mine)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in method.projector.parameters()])
    dist.all_reduce(grads)
    value = torch.tensor([float(out.loss)])
    dist.all_reduce(value)
    method.zero_grad()
    rows = MemoryBank(20, 16, world=1, rank=0, seed=cfg.run.seed).rows  # fp32, as the method's
    rows = F.normalize(rows, dim=1).double()  # what the loss scores against
    ref = _naive_instdisc(method.embed(full)["f"], full["index"], rows, 0.07)
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in method.projector.parameters()])
    return float(value) / world, float(ref), grads / world, ref_grads


def test_instdisc_softmax_on_two_ranks_equals_one_process():
    for value, ref, grads, ref_grads in run_ranks(_instdisc_softmax_rank, 2):
        assert value == pytest.approx(ref, rel=1e-10)
        assert torch.allclose(grads, ref_grads, rtol=1e-8, atol=1e-12)
        assert ref_grads.abs().max() > 1e-6
