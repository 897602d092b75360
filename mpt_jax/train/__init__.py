"""Training: optimizers, loss, the pure step functions, checkpoints, metrics, the trainer."""
