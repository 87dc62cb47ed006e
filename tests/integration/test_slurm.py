"""Multi-node runs, preemption and failures on a real Slurm cluster: one slurmctld and four
slurmd on this machine (slurm/local-cluster/start.sh), jobs submitted with slurm/train.sbatch,
one task per node, the ranks talking over gloo.

1. A 2-node and a 4-node job train to the end with the losses of the same run under torchrun
   (as many ranks on one node), bit for bit; the 4-node job, stopped through Slurm, requeues
   and ends with the same losses.
2. A job signalled through Slurm (``scancel --signal=USR1``) checkpoints, requeues itself,
   resumes from ``latest`` and ends at the same step with the same losses as (1).
3. A rank killed with SIGKILL fails the whole job within 2 minutes; ``latest`` stays usable.

Skipped, with the reason, where the cluster cannot start: not root, or slurm-wlm/munge missing
(``.ci/run`` installs them when it runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, run_torchrun

pytestmark = pytest.mark.slow
CONFIG = "configs/simclr_digits.yaml"
STEPS = 24
NODES = 4  # emulated nodes of the session's cluster; most jobs take 2
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs the jobs as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} not found): apt-get install "
            "slurm-wlm munge"
        )
    return None


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports."""
    for base in range(41000, 60000, 97):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@dataclass
class Cluster:
    env: dict[str, str]

    def cmd(self, *args: str) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc.stdout

    def submit(self, log: Path, overrides: dict, nodes: int = 2) -> int:
        args = [f"{k}={v}" for k, v in overrides.items()]
        out = self.cmd(
            "sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
            f"--output={log}", str(ROOT / "slurm/train.sbatch"), CONFIG, *args,
        )  # fmt: skip
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = self.cmd("scontrol", "show", "job", "--oneliner", str(job_id)).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in FINAL:
                return info
            time.sleep(0.2)
        self.cmd("scancel", str(job_id))
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {info}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Four emulated nodes (node1-node4) for the whole session; stopped at the end."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = cli_env()
    ports = _free_ports(NODES + 1)
    env.update(DC_SLURM_DIR=str(state), DC_SLURM_PORT=str(ports), DC_SLURM_CPUS="2")
    script = ROOT / "slurm/local-cluster"
    start = subprocess.run(
        [script / "start.sh", str(NODES)], env=env, capture_output=True, text=True, timeout=120
    )
    if start.returncode != 0:
        subprocess.run([script / "stop.sh"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"the local Slurm cluster did not start:\n{start.stderr[-3000:]}")
    env.update(SLURM_CONF=str(state / "slurm.conf"), PYTHON=sys.executable)
    try:
        yield Cluster(env)
    finally:
        subprocess.run([script / "stop.sh"], env=env, capture_output=True, timeout=120)


def _overrides(digits_dir: Path, run_dir: Path, name: str, **extra) -> dict:
    return {
        "run.dir": run_dir,
        "run.name": name,
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "train.steps": STEPS,
        "train.batch_size": 16,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "checkpoint.every": 4,
        "checkpoint.keep": 2,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
        **extra,
    }


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_rows(cluster: Cluster, job_id: int, run: Path, n: int, timeout: float = 240) -> None:
    """Until the job has logged ``n`` steps (it must still be running then)."""
    deadline = time.monotonic() + timeout
    while len(_rows(run)) < n:
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before step {n}"
        assert time.monotonic() < deadline, f"job {job_id} logged no step {n} in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def straight(slurm, digits_dir, tmp_path_factory):
    """The uninterrupted 2-node job: its run directory and final job record."""
    tmp = tmp_path_factory.mktemp("straight")
    job_id = slurm.submit(tmp / "job.out", _overrides(digits_dir, tmp, "straight"))
    info = slurm.wait(job_id, timeout=300)
    log = (tmp / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    return tmp / "straight", info, log


def test_two_node_job_equals_torchrun(straight, digits_dir, tmp_path):
    run, info, log = straight
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "2 task(s) on node[1-2], master node1:" in log
    args = [f"{k}={v}" for k, v in _overrides(digits_dir, tmp_path, "torchrun").items()]
    proc = run_torchrun(2, "train", "--config", CONFIG, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    slurm_rows, local_rows = _rows(run), _rows(tmp_path / "torchrun")
    assert [r["step"] for r in slurm_rows] == list(range(1, STEPS + 1))
    assert slurm_rows[0]["negatives_per_query"] == 2 * 16 * 2 - 2  # gathered across the nodes
    for key in ("loss", "lr", "alignment", "uniformity"):
        assert [r[key] for r in slurm_rows] == [r[key] for r in local_rows], key


def test_four_node_job_equals_torchrun_and_resumes_after_a_stop(slurm, digits_dir, tmp_path):
    """4 nodes x 1 task: the losses of torchrun with 4 ranks on one node, bit for bit; the same
    job stopped through Slurm (USR1 to its steps) after step 3 requeues, resumes from its
    checkpoint on the 4 nodes and ends with the same losses."""
    steps = 8
    extra = {"train.steps": steps, "data.val_shards": ""}
    runs = {}
    for name in ("straight4", "stopped4"):
        log = tmp_path / f"{name}.out"
        job_id = slurm.submit(log, _overrides(digits_dir, tmp_path, name, **extra), nodes=4)
        if name == "stopped4":
            _wait_rows(slurm, job_id, tmp_path / name, 3)
            slurm.cmd("scancel", "--signal=USR1", str(job_id))
        info = slurm.wait(job_id, timeout=400)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED", text[-3000:]
        assert info["NodeList"] == "node[1-4]" and info["NumNodes"] == "4"
        assert "4 task(s) on node[1-4], master node1:" in text
        runs[name] = (info, text)
    assert runs["straight4"][0]["Restarts"] == "0" and runs["stopped4"][0]["Restarts"] == "1"
    assert "requeueing job" in runs["stopped4"][1]
    args = [f"{k}={v}" for k, v in _overrides(digits_dir, tmp_path, "torchrun4", **extra).items()]
    proc = run_torchrun(4, "train", "--config", CONFIG, *args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = _rows(tmp_path / "torchrun4")
    assert [r["step"] for r in local] == list(range(1, steps + 1))
    assert local[0]["negatives_per_query"] == 2 * 16 * 4 - 2  # gathered across the 4 ranks
    for name in ("straight4", "stopped4"):
        rows = _rows(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), name
        for key in ("loss", "lr", "alignment", "uniformity"):
            assert [r[key] for r in rows] == [r[key] for r in local], (name, key)


# Where `scancel --signal=USR1` sends the stop: the tasks of the job's steps (the ranks), every
# process of the job (the batch shell, the ranks, their loader workers, the wandb service), or
# the batch shell only (as `#SBATCH --signal=B:USR1@...` does), which passes it on to the ranks.
HOW = {"steps": [], "full": ["--full"], "batch": ["--batch"]}


@pytest.mark.parametrize("how", list(HOW))
def test_preempted_job_requeues_and_resumes(slurm, straight, digits_dir, tmp_path, how):
    """With wandb on (offline): every process survives the stop until the checkpoint."""
    log = tmp_path / "job.out"
    overrides = _overrides(digits_dir, tmp_path, "preempted", **{"logging.wandb": "true"})
    job_id = slurm.submit(log, overrides)
    run = tmp_path / "preempted"
    _wait_rows(slurm, job_id, run, 3)
    slurm.cmd("scancel", "--signal=USR1", *HOW[how], str(job_id))
    info = slurm.wait(job_id, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "start 2 at" in text and "requeueing job" in text
    assert ("passing the stop on to the ranks" in text) == (how != "steps")
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1
    stopped = int(text.split("preempted at step ")[1].split(";")[0])
    assert "(SIGUSR1; every rank wrote the checkpoint of step" in text
    assert 3 <= stopped < STEPS
    rows, reference = _rows(run), _rows(straight[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # nothing replayed or lost
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    assert [r["lr"] for r in rows] == [r["lr"] for r in reference]
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{STEPS:08d}"


def test_a_requeued_job_whose_latest_is_damaged_goes_on_from_the_intact_step(
    slurm, straight, digits_dir, tmp_path
):
    """The node that died left `latest` damaged (bytes flipped in step 12): the requeued job
    (checkpoint.resume=latest_intact, added by train.sbatch on a restart) sets step 12 aside,
    says so, goes on from step 8 and ends with the losses of the uninterrupted job."""
    from hostile import flip

    log = tmp_path / "job.out"
    extra = {"train.stop_at": 12, "checkpoint.keep": 5}
    job_id = slurm.submit(log, _overrides(digits_dir, tmp_path, "damaged", **extra))
    info = slurm.wait(job_id, timeout=300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    run = tmp_path / "damaged"
    flip(run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt")
    slurm.cmd("scontrol", "requeue", str(job_id))
    time.sleep(1)
    info = slurm.wait(job_id, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "step_00000012 is damaged (mp_rank_00_model_states.pt: content differs" in text
    assert "newest intact step is step_00000008: continuing from it; set aside as " in text
    rows, reference = _rows(run), _rows(straight[0])
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference[:12]]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == [*(f"step_{s:08d}" for s in (4, 8, 12)), "step_00000012.damaged"]


def test_scancel_stops_with_a_checkpoint_and_is_not_undone(slurm, digits_dir, tmp_path):
    """scancel sends SIGTERM: the ranks stop with a checkpoint as on USR1, but the job stays
    cancelled (the script requeues only a stop the job asked for)."""
    log = tmp_path / "job.out"
    overrides = _overrides(digits_dir, tmp_path, "cancelled", **{"train.steps": 1000})
    job_id = slurm.submit(log, overrides)
    run = tmp_path / "cancelled"
    _wait_rows(slurm, job_id, run, 2)
    slurm.cmd("scancel", str(job_id))
    info = slurm.wait(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text[-3000:]
    stopped = int(text.split("preempted at step ")[1].split(";")[0])
    assert "(SIGTERM; every rank wrote the checkpoint of step" in text
    assert "not requeued" in text and "start 2 at" not in text
    time.sleep(8)  # longer than the local cluster's requeue delay: still cancelled
    assert slurm.job(job_id)["JobState"] == "CANCELLED"
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{stopped:08d}"


def _rank_pid(job_id: int, rank: int) -> int:
    """The training process of ``rank`` (not its loader workers): its environment names the
    job and the rank, its parent is Slurm's step daemon."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
            stat = (entry / "stat").read_text()
            parent = (Path("/proc") / stat.rsplit(")", 1)[1].split()[1] / "comm").read_text()
        except OSError:
            continue
        wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
        if wanted <= env and parent.strip() == "slurmstepd":
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} in job {job_id}")


def test_killed_rank_fails_the_job_quickly(slurm, digits_dir, tmp_path):
    from dist_contrast.train.checkpoint import load_model_state, read_latest

    log = tmp_path / "job.out"
    overrides = _overrides(digits_dir, tmp_path, "killed", **{"train.steps": 1000})
    job_id = slurm.submit(log, overrides)
    run = tmp_path / "killed"
    _wait_rows(slurm, job_id, run, 5)  # the checkpoint of step 4 is written
    os.kill(_rank_pid(job_id, 1), signal.SIGKILL)
    t0 = time.monotonic()
    info = slurm.wait(job_id, timeout=120)
    elapsed = time.monotonic() - t0
    print(f"SIGKILL of rank 1 -> job {info['JobState']} in {elapsed:.1f} s")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log.read_text()[-3000:]
    assert elapsed < 120
    assert len(_rows(run)) < 1000
    latest = read_latest(run / "checkpoints")  # a complete checkpoint, DeepSpeed's files whole
    state = load_model_state(latest)
    assert state and all(_finite(v) for v in state.values())


def _finite(t) -> bool:
    return bool(t.isfinite().all()) if t.is_floating_point() else True
