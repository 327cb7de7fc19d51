"""The run layer: the trainer (one iteration of any objective), the one loop and its components, run
assembly, checkpoints, the run folder, the weight EMA, metrics and held-out evaluation."""
