"""Training: procedural data, loss, trainer."""
