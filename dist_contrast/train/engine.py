"""The trainer: one training loop you can read top to bottom (what comes before it, the checks
and the DeepSpeed wrap, is :mod:`dist_contrast.train.setup`).

The engine knows a method only through ``method(batch) -> LossOutput``.
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_contrast import distributed
from dist_contrast.config import Config
from dist_contrast.data.augment import DeviceAugment
from dist_contrast.data.loader import TrainLoader, train_loader
from dist_contrast.data.tario import FAULT_REASONS
from dist_contrast.distributed import mix_seed
from dist_contrast.errors import DivergedError, ResourceError
from dist_contrast.methods import LossOutput, Method, build_method
from dist_contrast.train import checkpoint, elastic, integrity, preempt, strays
from dist_contrast.train.accumulate import cached_step, plain_step
from dist_contrast.train.guard import StepGuard
from dist_contrast.train.metrics import MetricsLogger, SampleKeyLog, embedding_metrics
from dist_contrast.train.plots import write_plots
from dist_contrast.train.runs import lock_run_dir, save_run_config
from dist_contrast.train.setup import initial_method, prepare, start_over, wrap

# DeepSpeed's ZeRO-2 calls a collective that torch now marks deprecated; it is not ours to fix.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")

PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Tensors to ``device`` (floating ones cast to ``dtype``); other values as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            cast = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
            v = v.to(device, dtype=cast, non_blocking=True)
        out[k] = v
    return out


Evaluator = Callable[[Method, int], dict[str, float]]


def unpartitioned(cfg: Config, module: Method) -> Method:
    """A copy of a ZeRO-3 ``module`` with whole parameters, for evaluation: ZeRO-3 gathers a
    module's parameters in its forward, a collective every rank must join, and the ranks embed
    different numbers of batches (their shares of a set differ), so evaluating the partitioned
    module stops the job. Gathered once, on every rank, in the same order; the copy takes the
    parameters' dtype and device and is dropped after the evaluation."""
    import deepspeed

    params = list(module.parameters())
    copy = build_method(cfg)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        copy.load_state_dict(module.state_dict())  # copied while whole: no second copy
    return copy.to(device=params[0].device, dtype=params[0].dtype)


def train(cfg: Config, evaluate: Evaluator | None = None) -> Path:
    """Train ``cfg`` on every rank of the job; return the run directory. ``evaluate(method,
    step)``: the figures every ``eval.every`` steps (given by the CLI: :mod:`dist_contrast.eval`
    sits after training in the layering), called on every rank."""
    prepare(cfg)
    # Rank 0 owns the run dir for the run's life: a second run on it is refused before any
    # process group starts (its peers are then ended by the launcher).
    lock = lock_run_dir(cfg.run_dir) if distributed.detect_env().rank == 0 else None
    try:
        # SIGUSR1/SIGTERM: stop at the next step with a checkpoint (preempt.py), from the start.
        with preempt.StopSignals(cfg.train.stop_grace_s) as stop:
            env = distributed.init(cfg.train.collective_timeout_s)
            try:
                return _train(cfg, env, stop, evaluate)
            finally:
                # The engine, its groups and their pending work go while the interpreter and
                # the process group are alive: left in reference cycles to the interpreter's
                # exit, a rank sometimes aborted there (SIGABRT, "terminate called without an
                # active exception") after its run had ended, and the job failed.
                gc.collect()
                distributed.shutdown()
    finally:
        if lock is not None:
            lock.close()


def _train(
    cfg: Config,
    env: distributed.DistEnv,
    stop: preempt.StopSignals | None = None,
    evaluate: Evaluator | None = None,
) -> Path:
    run_dir, main = cfg.run_dir, distributed.is_main()
    if main:
        start_over(cfg)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, run_dir)
    distributed.barrier()

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    engine, _, scheduler = wrap(initial_method(cfg), cfg, env.world_size)
    loader = train_loader(
        cfg.data, cfg.augment, cfg.train.batch_size, cfg.run.seed, env.rank, env.world_size
    )
    trainer = Trainer(cfg, engine, scheduler, loader, env.rank, env.world_size)
    trainer.stop = stop
    trainer.evaluate = evaluate if cfg.eval.every else None
    token = strays.new_token()  # carried by what the loader starts (workers, pipe: commands)
    try:
        trainer.resume()
        with preempt.held(), strays.marked(token):  # workers forked here ignore stop signals
            loader.start()  # the first batches are made while the logger (wandb) starts
        trainer.logger = MetricsLogger(run_dir, cfg, trainer.step, enabled=main)
        if cfg.logging.sample_keys:
            trainer.key_log = SampleKeyLog(run_dir, trainer.step, env.rank, env.world_size)
        try:
            with strays.marked(token):
                trainer.run()
        except preempt.Preempted as stopped:
            if not stopped.agreed:  # leaving alone: see below
                _leave_alone(token)
            raise
        finally:
            trainer.logger.close()
            if trainer.key_log is not None:
                trainer.key_log.close()
    finally:
        loader.close()  # on success, error or stop: no worker outlives the rank,
        strays.end(token)  # nor anything a worker started (a stalled pipe: shard's command)
    if main and cfg.logging.plots:
        write_plots(run_dir / "metrics.jsonl", run_dir / "plots")
    return run_dir


# How an allocation failure reads: CUDA's OutOfMemoryError, the CPU allocator's refusal
OOM_MARKERS = ("out of memory", "can't allocate memory", "Cannot allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in OOM_MARKERS)


def oom_error(cfg: Config, step: int, exc: BaseException) -> ResourceError:
    """The one line of a step that needed more memory than there is, with the remedies."""
    t = cfg.train
    where = "the GPU" if torch.cuda.is_available() else "this machine"
    detail = (str(exc).strip().splitlines() or ["out of memory"])[0][:200]
    return ResourceError(
        f"out of memory at step {step} on {where} with train.batch_size={t.batch_size} per "
        f"rank, model.encoder={cfg.model.encoder}, deepspeed.precision="
        f"{cfg.deepspeed.precision} ({detail}): lower train.batch_size (train.accumulation=K "
        "keeps the global batch and, in cached mode, every negative), or set "
        "model.activation_checkpointing=true, loss.memory_efficient=true, "
        "deepspeed.zero_stage=3"
    )


def _leave_alone(token: str) -> None:
    """A rank that leaves without its peers (it gave up waiting for data) first ends its
    process group, so that a peer blocked in a collective of the step fails at once instead of
    after this rank's clean-up, and the commands that read the data it gave up on (a stalled
    ``pipe:`` shard's), so that its loader's workers end without being waited for."""
    distributed.shutdown()
    strays.end(token, children=False)


@dataclass
class Window:
    """What is summed between two logged steps (the loss over the steps taken only). The sum
    stays on the device, in float64 (what Python floats summed before), until the log step."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    loss_sum: torch.Tensor | float = 0.0
    n: int = 0
    data_wait: float = 0.0

    def add(self, loss: torch.Tensor, taken: bool) -> None:
        if taken:
            self.loss_sum, self.n = self.loss_sum + loss.detach().double(), self.n + 1


class Trainer:
    """The training loop and what it must keep: step, data position, metrics.

    ``step`` counts batches consumed, skipped ones included: the data position, checkpoint
    names, ``train.stop_at`` and the log cadence follow it. The LR schedule counts the steps
    taken (a skipped step does not advance it), and so does the optimizer."""

    def __init__(
        self, cfg: Config, engine, scheduler, loader: TrainLoader, rank: int, world: int
    ) -> None:
        self.cfg, self.engine, self.scheduler, self.loader = cfg, engine, scheduler, loader
        self.rank, self.world, self.step = rank, world, 0
        self.device, self.dtype = distributed.device(), PRECISION[cfg.deepspeed.precision]
        self.augment = DeviceAugment(cfg.augment, cfg.data).to(self.device)
        self.ckpt_root = cfg.run_dir / "checkpoints"
        self.logger: MetricsLogger | None = None
        self.key_log: SampleKeyLog | None = None  # logging.sample_keys
        self.stop: preempt.StopSignals | None = None  # set: a signal stops the run at a step end
        self.evaluate: Evaluator | None = None  # set: figures every eval.every steps
        fp16 = cfg.deepspeed.precision == "fp16"  # gradients: DeepSpeed's loss scaler decides
        self.guard = StepGuard(engine.module, scheduler.optimizer, check_grads=not fp16)

    def resume(self) -> None:
        """Continue from ``checkpoint.resume``: on the ranks and workers that wrote it,
        bit-exactly from each rank's own state; on others, each rank's share of the saved
        ranks' states (:mod:`dist_contrast.train.elastic`), said in one line."""
        step_dir = integrity.choose(self.ckpt_root, self.cfg.checkpoint.resume)
        if step_dir is None:
            return
        checkpoint.check_world(step_dir, self.world)
        client = checkpoint.load(self.engine, step_dir)
        self.step = int(client["step"])
        if "scheduler" in client:
            self.scheduler.load_state_dict(client["scheduler"])
        self.guard.skipped_steps = int(client.get("skipped_steps", 0))
        own = checkpoint.load_rank_state(step_dir, self.rank)
        if own is not None and elastic.same_layout(own, self.world, self.loader.workers):
            self.loader.load_state_dict(own["data"])
            self.engine.module.load_extra_state(own["method"])
            if "rng" in own:
                checkpoint.set_rng_state(own["rng"])
            return
        states = elastic.saved_states(step_dir)
        if states is None:
            if distributed.is_main():
                print(
                    f"dist-contrast: warning: {step_dir} holds no per-rank state: the data "
                    f"stream restarts and rank-local state (queues) is new",
                    file=sys.stderr,
                )
            return
        line = elastic.resume_elastic(
            self.loader, self.engine.module, states, self.cfg.run.seed, self.step, self.rank
        )
        if distributed.is_main():
            print(f"dist-contrast: {line}", file=sys.stderr, flush=True)

    def save(self) -> None:
        state = {
            "world": self.world,
            "data": self.loader.state_dict(),
            "method": self.engine.module.extra_state(),
            "rng": checkpoint.rng_state(),
        }
        client = {
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.guard.skipped_steps,
        }
        checkpoint.save(
            self.engine, self.ckpt_root, self.step, self.cfg.checkpoint.keep, state, client
        )

    def augment_batch(self, batch: dict) -> dict:
        """The per-pixel half of the views, on the training device."""
        batch = to_device(batch, self.device)
        seed = mix_seed(self.cfg.run.seed, self.step, self.rank, 3)
        return to_device(self.augment(batch, seed), self.device, self.dtype)

    def run(self) -> None:
        """Train from ``step`` to ``train.stop_at`` or ``train.steps``; on a stop signal, stop
        at the end of a step with a checkpoint, or sooner without (see :mod:`preempt`)."""
        with preempt.held():  # workers forked here never act on a stop signal
            self.loader.start()
        self.saved: int | None = self.step or None  # the step of the last checkpoint
        self.fetcher = preempt.Fetcher(iter(self.loader))  # batches, waited for interruptibly
        try:
            self.loop()
        finally:
            self.fetcher.close()

    def loop(self) -> None:
        cfg = self.cfg
        window = Window(self.step)
        end = cfg.train.stop_at or cfg.train.steps
        while self.step < end:
            t0 = time.perf_counter()
            batch = self.fetcher.next(self.give_up)
            window.data_wait += time.perf_counter() - t0  # the loader kept this rank waiting
            keys = batch.get("key") if self.key_log is not None else None
            try:
                batch = self.augment_batch(batch)
                out, taken = self.train_step(batch)
            except RuntimeError as exc:  # a collective of the step failed
                self.raise_if_peer_stopped(exc)
                raise
            self.step += 1  # the batch is consumed, whether the step was taken or skipped
            if keys is not None:
                self.key_log.write(self.step, keys)
            window.add(out.loss, taken)  # no host read: the guard's decision is the step's one
            self.logger.advance()
            last = self.step == end
            if self.step % cfg.train.log_every == 0 or last:
                self.logger.log(self.record(window, out))
                window = Window(self.step)
            saved = self.step % cfg.checkpoint.every == 0 or last
            if saved:
                t_save = time.perf_counter()
                self.save()
                self.saved = self.step
                window.start += time.perf_counter() - t_save  # throughput excludes saving
            if self.evaluate is not None and self.step % cfg.eval.every == 0:
                t_eval = time.perf_counter()
                self.periodic_eval()
                window.start += time.perf_counter() - t_eval
            if not last and self.stop is not None and self.stop.agreed():
                if not saved:
                    self.save()
                raise self.stop.stop(self.step)  # every rank, after the same checkpoint

    def give_up(self) -> preempt.Preempted | None:
        """While this rank waits for a batch: the stop that cannot wait for it any longer, once
        the signal is ``train.stop_grace_s`` old. A batch that comes sooner ends the step, and
        the stop is agreed at its end as usual; a rank that gives up leaves alone, back to its
        last checkpoint (when it took no step since, nothing is lost)."""
        stop = self.stop
        if stop is None or not stop.expired():
            return None
        why = f"no batch came within train.stop_grace_s={stop.grace_s:g} s"
        return stop.alone(self.step, self.saved, why)

    def raise_if_peer_stopped(self, exc: RuntimeError) -> None:
        """A collective that failed because a peer left, on a rank that received a stop
        signal: the peer gave up waiting for data (:meth:`give_up`), so does this rank. A peer
        that left without its stop line was killed (:func:`preempt.peer_stopped`): the error
        goes on, a failure."""
        said = distributed.peer_gone(exc)
        if said and self.stop is not None and self.stop.requested and preempt.peer_stopped():
            why = f"another rank left during step {self.step + 1} ({said})"
            raise self.stop.alone(self.step, self.saved, why) from exc

    def periodic_eval(self) -> None:
        """The figures of the model now (``eval.every``), logged as ``eval/<name>``. Training
        does not notice: the RNG states are put back afterwards, the loader is not touched
        (the sets are read apart from it) and the modules return to train mode."""
        rng = checkpoint.rng_state()
        try:
            module = self.engine.module
            if self.cfg.deepspeed.zero_stage == 3:
                module = unpartitioned(self.cfg, module)
            figures = self.evaluate(module, self.step)
        finally:
            checkpoint.set_rng_state(rng)
        self.logger.log_eval({"step": self.step, **{f"eval/{k}": v for k, v in figures.items()}})

    def train_step(self, batch: dict) -> tuple[LossOutput, bool]:
        """One optimizer step over ``batch``, or none if its loss or gradients are not finite
        on some rank (the same decision on every rank); whether the step was taken."""
        self.check_full(batch)
        with distributed.equal_rows():  # so the gathers need not exchange sizes
            out = self.optimizer_step(batch)
        taken = self.guard.end_step(self.engine.was_step_applied())
        if taken:
            self.scheduler.step()
            self.engine.module.on_step_end(self.step + 1, self.cfg.train.steps)
        elif self.guard.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise DivergedError(
                f"stopped at step {self.step + 1}: {self.guard.bad_in_a_row} steps in a row had "
                f"a non-finite loss or gradient on some rank (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); lower train.lr or raise train.warmup_steps, "
                f"and continue from the last checkpoint with checkpoint.resume=latest"
            )
        return out, taken

    def check_full(self, batch: dict) -> None:
        """Every per-sample tensor of ``batch`` holds ``train.batch_size`` rows, as the loader
        makes them on every rank (it drops partial batches): what lets a step's gathers skip
        exchanging their sizes. A rank that breaks it stops here, before any collective."""
        rows = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()}
        if rows != {self.cfg.train.batch_size}:
            raise RuntimeError(
                f"a training batch has {sorted(rows)} rows per tensor on rank {self.rank}, "
                f"not train.batch_size={self.cfg.train.batch_size}"
            )

    def optimizer_step(self, batch: dict) -> LossOutput:
        """Forward, backward and DeepSpeed's step over this rank's batch (gradient clipping
        and accumulation included; the guard's pre-hook may turn the update into a no-op)."""
        try:
            return self._optimizer_step(batch)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            raise oom_error(self.cfg, self.step + 1, exc) from None

    def _optimizer_step(self, batch: dict) -> LossOutput:
        parts = self.cfg.train.accumulation
        if parts == 1:
            out = self.engine(batch)
            self.engine.backward(out.loss)
            self.engine.step()
            return out
        if self.cfg.train.accumulation_mode == "cached":
            return cached_step(self.engine, batch, parts)
        return plain_step(self.engine, batch, parts)

    def record(self, window: Window, out: LossOutput) -> dict:
        """One line of metrics.jsonl: means over the steps since the last one, all ranks."""
        elapsed = time.perf_counter() - window.start
        samples = self.cfg.train.batch_size * self.world * (self.step - window.first_step)
        loss = distributed.all_reduce_mean(window.loss_sum / window.n) if window.n else None
        return {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_sec": samples / elapsed,
            "negatives_per_query": self.engine.module.negatives_per_query(
                self.loss_batch, self.world
            ),
            "data_wait_frac": distributed.all_reduce_mean(window.data_wait / elapsed),
            "skipped_steps": self.guard.skipped_steps,
            "bad_steps_in_a_row": self.guard.bad_in_a_row,
            **self.skipped(),
            **self.embedding_metrics(out),
            **{k: distributed.all_reduce_mean(v) for k, v in out.metrics.items()},
        }

    def embedding_metrics(self, out: LossOutput) -> dict[str, float]:
        """Alignment and uniformity (Wang & Isola 2020) of the first two embeddings the step's
        loss was computed from (two views, or image and text; train mode, as the loss saw them;
        the last micro-batch's under plain accumulation): no second forward; {} if the method
        gives one embedding per sample. Means over ranks."""
        values = embedding_metrics(list(out.embeddings.values()))
        return {k: distributed.all_reduce_mean(v) for k, v in values.items()}

    @property
    def loss_batch(self) -> int:
        """Samples per rank that one loss sees (its negatives come from them)."""
        t = self.cfg.train
        return t.batch_size if t.accumulation_mode == "cached" else t.batch_size // t.accumulation

    def skipped(self) -> dict[str, int]:
        """Skipped data so far, summed over ranks, by reason (``skipped_<reason>``)."""
        faults = self.loader.faults()
        totals = distributed.all_reduce_sum([faults[k] for k in FAULT_REASONS])
        out = {f"skipped_{k}": int(v) for k, v in zip(FAULT_REASONS, totals, strict=True)}
        out["skipped_total"] = sum(out.values())
        return out
