"""Training: the loop, train step, optimiser, losses, evaluation, data-parallel layouts,
multi-process setup, checkpoints, preemption and run files."""
