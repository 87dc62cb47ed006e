"""The trainer: the engine (DeepSpeed wrap and the loop), accumulation, the step guard,
preemption, checkpoints, the optimizer, metrics and plots, and the run directory."""
