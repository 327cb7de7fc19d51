"""The command lines: training, held-out evaluation, the real-scale planner, and the toy demo with its
pretraining."""
