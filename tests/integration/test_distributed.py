import torch

from dist_contrast import distributed
from dist_contrast.distributed import detect_env, expand_nodelist

from multiproc import run_ranks


def test_expand_nodelist():
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("node[1-3]") == ["node1", "node2", "node3"]
    assert expand_nodelist("gpu[08-10,15],login1") == ["gpu08", "gpu09", "gpu10", "gpu15", "login1"]
    assert expand_nodelist("a[1,3],b[2-3]") == ["a1", "a3", "b2", "b3"]


def test_detect_env_torchrun_slurm_and_none():
    env = detect_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "4",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("h0", 1234)

    slurm = detect_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NNODES": "4",
            "SLURM_JOB_NODELIST": "cn[03-06]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size) == (5, 8, 1, 2)
    assert slurm.master_addr == "cn03" and slurm.launcher == "slurm"
    assert slurm.master_port == 15000 + 4242
    again = detect_env(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "8",
            "SLURM_JOB_NODELIST": "cn[03-06]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert again.master_port == slurm.master_port  # every node agrees

    none = detect_env({})
    assert (none.rank, none.world_size, none.launcher) == (0, 1, "none")


def _gather_case(rank, world):
    torch.manual_seed(0)
    sizes = [3, 1, 4, 2][:world]
    full = torch.randn(sum(sizes), 5, dtype=torch.float64)
    weight = torch.randn(sum(sizes), 5, dtype=torch.float64)
    start = sum(sizes[:rank])
    local = full[start : start + sizes[rank]].clone().requires_grad_(True)
    gathered, offset = distributed.all_gather_with_offset(local)
    assert offset == start
    assert torch.equal(gathered.detach(), full)
    # A rank-dependent loss over the gathered rows, as an in-batch loss would be.
    ((gathered * weight).sum() * (rank + 1)).backward()
    return local.grad


def test_all_gather_with_offset_uneven_sizes_exact_backward():
    world = 3
    grads = run_ranks(_gather_case, world)
    torch.manual_seed(0)
    sizes = [3, 1, 4]
    torch.randn(sum(sizes), 5, dtype=torch.float64)
    weight = torch.randn(sum(sizes), 5, dtype=torch.float64)
    # Sum over ranks r of (r + 1) * weight: the gradient of the sum of all ranks' losses.
    expected = weight * sum(r + 1 for r in range(world))
    assert torch.allclose(torch.cat(grads), expected)


def test_single_process_gather_is_identity():
    x = torch.randn(4, 3)
    out, offset = distributed.all_gather_with_offset(x)
    assert out is x and offset == 0
