"""Training: the loop, checkpoints, the run folder and its event stream."""
