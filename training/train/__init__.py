"""train: the training loop, checkpoints, DDP and the nightly retrain job's work."""
