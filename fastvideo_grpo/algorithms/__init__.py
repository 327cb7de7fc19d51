"""The algorithm layer: what one iteration does between the model and the run (rollout, advantages, the
objectives and the update driver that trains them, SDE windows, pass counts)."""
